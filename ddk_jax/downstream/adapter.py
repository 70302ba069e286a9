"""`DDKJaxLM`: an lm-evaluation-harness model (registered as `ddk_jax`) over our Flax model.

Built from `(params, ModelConfig, TextTokenizer)`, so it serves a run's student
(`DDKJaxLM.from_run`, via `checkpointing.restore_student_params`) or a Hugging Face
directory (`DDKJaxLM.from_hf`, via `hf.load_hf_checkpoint`).  Every request goes through
one compiled, packed forward (`scorer.PackedForward`).

Conventions (those of lm-eval's Hugging Face backend, `hf`):
* Text is encoded with the tokenizer's vocabulary and no post-processor; a context gets
  `[BOS]` in front when `add_bos_token` (default: the tokenizer has a BOS token), unless the
  text already starts with the BOS token's text.  An empty context is the prefix token
  (`prefix_token_id`: BOS, else EOS).  `loglikelihood` splits a pair as lm-eval does
  (encode context + continuation, the continuation is what follows the context's tokens).
* A request longer than `max_length` keeps its last `max_length + 1` tokens (context cut
  from the left, as lm-eval does, counted in a warning); a continuation longer than
  `max_length` is refused with a ValueError.
* `loglikelihood_rolling` scores every token of the text (encoded without BOS), each
  window conditioned on the prefix token or the previous window, windows of `max_length`.
* `generate_until`: greedy only, stopping at EOS, at any `until` string, or after
  `max_gen_toks`; without a KV cache each new token costs one forward over the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import lm_eval.models  # noqa: F401  (fills the registry's built-in names before ours is added)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ddk_jax.data.tokenizer import TextTokenizer, load_tokenizer
from ddk_jax.downstream.scorer import PackedForward
from ddk_jax.model import ModelConfig

_log = logging.getLogger("ddk_jax.downstream")

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_SEQ_LEN = 2048


def _as_int(name: str, value: Any) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"ddk_jax model argument {name}={value!r} is not an integer") from None


def default_mesh():
  """Every device on the fsdp axis: batches split over all devices, params sharded (ZeRO-3)."""
  from ddk_jax import sharding
  return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


@register_model("ddk_jax")
class DDKJaxLM(TemplateLM):
  """lm-eval model over a ddk_jax Flax model; see the module docstring for the conventions.

  Args:
    params, model_config, tokenizer: the model and its tokenizer (a TextTokenizer or a path
      `load_tokenizer` accepts).  Alternatively `pretrained=HF_DIR` or `workdir=RUN_DIR`
      (with `step=`), as in `lm_eval --model ddk_jax --model_args pretrained=DIR`.
    seq_len: tokens per packed row (default: min(max_position_embeddings, 2048)).
    batch_size: rows per forward (over all processes).
    max_length: the longest request in tokens (default and at most: seq_len).
    max_gen_toks: default number of generated tokens when a task does not say.
    add_bos_token: put BOS before contexts (default: when the tokenizer has one).
    prefix_token_id: the token an empty context stands for (default: BOS, else EOS).
    mesh, rules: see `scorer.PackedForward`.
  """

  def __init__(self, params: Any = None, model_config: ModelConfig | None = None,
               tokenizer: TextTokenizer | str | None = None, *, pretrained: str | None = None,
               workdir: str | None = None, step: int | None = None, seq_len: int | None = None,
               batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_length: int | None = None,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, param_dtype: str | None = None,
               compute_dtype: str | None = None, mesh=None, rules=None, **unused: Any):
    super().__init__()
    for key in ("device", "max_batch_size"):  # harness-wide options that have no meaning here
      unused.pop(key, None)
    if unused:
      raise TypeError(f"ddk_jax model: unknown arguments {sorted(unused)}")
    if params is None:
      if bool(pretrained) == bool(workdir):
        raise ValueError("ddk_jax model: give params + model_config + tokenizer, or exactly one of "
                         "pretrained=HF_DIR and workdir=RUN_DIR")
      if pretrained:
        params, model_config, tokenizer = _load_hf(pretrained, tokenizer, param_dtype, mesh, rules)
      else:
        params, model_config, tokenizer = _load_run(workdir, _as_int("step", step), tokenizer, param_dtype, mesh,
                                                    rules)
    if model_config is None or tokenizer is None:
      raise ValueError("ddk_jax model: params need their model_config and tokenizer")
    if compute_dtype:
      model_config = dataclasses.replace(model_config, compute_dtype=compute_dtype)
    if not isinstance(tokenizer, TextTokenizer):
      tokenizer = load_tokenizer(os.fspath(tokenizer))
    if tokenizer.max_id >= model_config.vocab_size:
      raise ValueError(f"tokenizer {tokenizer.path} has ids up to {tokenizer.max_id}, beyond the model's vocab_size "
                       f"{model_config.vocab_size}")
    self.text_tokenizer = tokenizer
    self.model_config = model_config
    seq_len = _as_int("seq_len", seq_len) or min(model_config.max_position_embeddings, DEFAULT_SEQ_LEN)
    max_length = _as_int("max_length", max_length) or seq_len
    if max_length > seq_len:
      raise ValueError(f"max_length={max_length} exceeds seq_len={seq_len}: a request must fit one packed row; "
                       f"raise seq_len or lower max_length")
    self._max_length = max_length
    if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
      batch_size = DEFAULT_BATCH_SIZE
    self.forward = PackedForward(params, model_config, seq_len=seq_len, batch_size=_as_int("batch_size", batch_size),
                                 mesh=mesh, rules=rules)
    self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
    self.add_bos_token = (tokenizer.bos_id is not None) if add_bos_token is None else bool(add_bos_token)
    if self.add_bos_token and tokenizer.bos_id is None:
      raise ValueError(f"add_bos_token=True but tokenizer {tokenizer.path} has no BOS token")
    self._prefix_token_id = _as_int("prefix_token_id", prefix_token_id)
    self._bos_text = None if tokenizer.bos_id is None else tokenizer.backend.id_to_token(tokenizer.bos_id)

  # -- construction from a checkpoint ------------------------------------------------

  @classmethod
  def from_hf(cls, path: str, *, tokenizer: TextTokenizer | str | None = None, param_dtype: str | None = None,
              mesh=None, rules=None, **kwargs) -> "DDKJaxLM":
    """A Hugging Face safetensors directory (its tokenizer files too, unless `tokenizer` is given)."""
    params, cfg, tok = _load_hf(path, tokenizer, param_dtype, mesh, rules)
    return cls(params, cfg, tok, mesh=mesh, rules=rules, **kwargs)

  @classmethod
  def from_run(cls, workdir: str, *, step: int | None = None, tokenizer: TextTokenizer | str | None = None,
               param_dtype: str | None = None, mesh=None, rules=None, **kwargs) -> "DDKJaxLM":
    """The student of a ddk_jax run (latest committed step unless `step`), with the run's tokenizer."""
    params, cfg, tok = _load_run(workdir, step, tokenizer, param_dtype, mesh, rules)
    return cls(params, cfg, tok, mesh=mesh, rules=rules, **kwargs)

  # -- what lm-eval asks of a model ----------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.text_tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    if self._prefix_token_id is not None:
      return self._prefix_token_id
    bos = self.text_tokenizer.bos_id
    return bos if bos is not None else self.text_tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self.forward.batch_size

  @property
  def tokenizer_name(self) -> str:
    return str(self.text_tokenizer.path).replace("/", "__")

  def get_model_info(self) -> dict:
    return {"model_num_parameters": self.model_config.num_params(), "model_dtype": self.model_config.param_dtype,
            "seq_len": self.forward.seq_len, "max_length": self.max_length}

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    ids = self.text_tokenizer.backend.encode(string, add_special_tokens=False).ids
    if add_special_tokens is None:
      add_bos = self.add_bos_token and not (self._bos_text and string.startswith(self._bos_text))
    else:
      add_bos = add_special_tokens and self.text_tokenizer.bos_id is not None
    if add_bos:
      ids = [self.text_tokenizer.bos_id] + ids
    if left_truncate_len:
      ids = ids[-left_truncate_len:]
    return ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    if isinstance(tokens, (int, np.integer)):
      tokens = [tokens]
    return self.text_tokenizer.backend.decode([int(t) for t in tokens], skip_special_tokens=skip_special_tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """`requests`: `((context, continuation) or None, context ids, continuation ids)`."""
    sequences, truncated = [], 0
    for (_, ctx, cont) in requests:
      if not cont:
        raise ValueError("an empty continuation has no log-likelihood to score")
      if len(cont) > self.max_length:
        raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length={self.max_length} "
                         "(seq_len bounds it); raise seq_len/max_length")
      whole = list(ctx) + list(cont)
      if len(whole) > self.max_length + 1:
        truncated += 1
        whole = whole[-(self.max_length + 1):]
      sequences.append((tuple(whole), len(cont)))
    if truncated:
      _log.warning("%d of %d requests are longer than max_length=%d tokens: their contexts were cut from the left",
                   truncated, len(sequences), self.max_length)
    # Identical requests (e.g. shared by several tasks or repeats) are scored once.
    unique: dict[tuple, int] = {}
    order = [unique.setdefault(s, len(unique)) for s in sequences]
    bar = tqdm(total=len(unique), disable=disable_tqdm, desc="ddk_jax loglikelihood")
    try:
      scores = self.forward.score(list(unique), progress=bar.update)
    finally:
      bar.close()
    out = [scores[k] for k in order]
    for (pair, _, _), answer in zip(requests, out):
      if pair is not None:
        self.cache_hook.add_partial("loglikelihood", pair, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, req in enumerate(requests):
      (text,) = req.args
      tokens = self.tok_encode(text, add_special_tokens=False)
      for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
          token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, scores):
      totals[i] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    prompts, limits, stops = [], [], []
    for req in requests:
      context, gen_kwargs = req.args
      gen_kwargs = dict(gen_kwargs or {})
      if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0.0:
        raise NotImplementedError("ddk_jax generates greedily only; the task asks for sampling "
                                  f"(do_sample / temperature in {gen_kwargs})")
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      if eos_text not in until:
        until.append(eos_text)
      limit = next((int(gen_kwargs[k]) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                    if gen_kwargs.get(k) is not None), self.max_gen_toks)
      if limit >= self.max_length:
        raise ValueError(f"max_gen_toks={limit} leaves no room for a prompt within max_length={self.max_length}")
      ids = self.tok_encode(context, left_truncate_len=self.max_length - limit) if context else []
      prompts.append(ids or [self.prefix_token_id])
      limits.append(limit)
      stops.append([s for s in until if s])

    def should_stop(i: int, generated: list[int]) -> bool:
      if generated[-1] == self.eot_token_id:
        return True
      text = self.tok_decode(generated)
      return any(s in text for s in stops[i])

    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="ddk_jax generate_until")
    try:
      generated = self.forward.generate(prompts, limits, should_stop, progress=bar.update)
    finally:
      bar.close()
    out = []
    for req, ids, stop in zip(requests, generated, stops):
      if ids and ids[-1] == self.eot_token_id:
        ids = ids[:-1]
      text = self.tok_decode(ids)
      cut = min((text.find(s) for s in stop if s in text), default=len(text))
      text = text[:cut]
      self.cache_hook.add_partial("generate_until", req.args, text)
      out.append(text)
    return out

  def update_params(self, params: Any) -> None:
    """Evaluate other values of the same model (e.g. the live student during training): the
    same shapes, dtypes and shardings reuse the compiled forward."""
    self.forward.params = params

  # -- several processes ---------------------------------------------------------------

  def serve(self) -> int:
    """On processes other than 0: run process 0's batches until it calls `stop()`."""
    return self.forward.serve()

  def stop(self, ok: bool = True) -> None:
    """On process 0 after an evaluation: release the processes in `serve()`."""
    self.forward.stop(ok)


def _load_hf(path, tokenizer, param_dtype, mesh, rules):
  from ddk_jax.hf import load_hf_checkpoint
  params, cfg = load_hf_checkpoint(os.fspath(path), mesh=mesh, rules=rules, param_dtype=param_dtype)
  return params, cfg, tokenizer if tokenizer is not None else load_tokenizer(os.fspath(path))


def _load_run(workdir, step, tokenizer, param_dtype, mesh, rules):
  from ddk_jax import checkpointing, sharding
  mesh = mesh if mesh is not None else default_mesh()
  rules = rules if rules is not None else sharding.DEFAULT_RULES
  overrides = {"param_dtype": param_dtype} if param_dtype else None
  cfg, params = checkpointing.restore_student_params(os.fspath(workdir), mesh, rules, overrides, step=step)
  if tokenizer is None:
    from ddk_jax.data.tokenizer import load_tokenizer_from_config
    step = checkpointing.latest_good_step(workdir) if step is None else step
    manager = checkpointing.open_reader(os.fspath(workdir))
    try:
      data_cfg = checkpointing.restore_meta(manager, step)["config"]["data"]
    finally:
      manager.close()
    tokenizer = load_tokenizer_from_config(data_cfg)
  return params, cfg, tokenizer
