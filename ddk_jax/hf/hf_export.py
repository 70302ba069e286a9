"""Export our params as a Hugging Face checkpoint directory transformers loads.

Writes config.json (transformers-5 form), model.safetensors (or size-bounded shards plus
model.safetensors.index.json), generation_config.json and, optionally, tokenizer files.

Memory: each param is gathered to the host one at a time (a `process_allgather` when it
is sharded across hosts) and streamed into the safetensors file per layer; the file
headers are computed up front from the config, so no file is ever held in memory.

Atomicity: files are written to a hidden temporary directory next to `out_dir` and
renamed into place at the end, so a failed export leaves no half-written checkpoint.
For gs:// targets the directory is staged locally and uploaded with config.json last
(a checkpoint without config.json is rejected by the importer).  All processes must call
this (the gathers are collective); only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from ddk_jax.cli import TransferProgress
from ddk_jax.hf.hf_config import hf_config_from_model_config
from ddk_jax.hf.hf_import import CONFIG_FILE, INDEX_FILE, NP_TO_ST, SINGLE_FILE
from ddk_jax.hf.param_names import TensorMap, param_mapping
from ddk_jax.model import DTYPES, ModelConfig, param_shapes_and_axes

_log = logging.getLogger("ddk_jax.hf")
EXPORT_DTYPES = ("bfloat16", "float32", "float16")
# Files copied from a tokenizer directory (never *.py: no remote code travels with the export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def default_architecture(cfg: ModelConfig) -> str:
  """The plainest HF class that holds `cfg` exactly."""
  if cfg.attention_bias:
    return "Qwen2ForCausalLM"
  if cfg.sliding_window:
    return "MistralForCausalLM"
  return "LlamaForCausalLM"


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _plan(cfg: ModelConfig, architecture: str) -> list[tuple[str, tuple[int, ...], TensorMap | None, int | None]]:
  """(hf_name, hf_shape, source map or None for zeros, layer) for every tensor, in write order."""
  plan = []
  for m in param_mapping(cfg):
    for i in range(cfg.num_layers if m.stacked else 1):
      plan.append((m.hf_name.format(i=i) if m.stacked else m.hf_name, m.hf_shape, m, i if m.stacked else None))
  if architecture == "Qwen2ForCausalLM" and not cfg.attention_bias:
    # Qwen2 always has q/k/v biases; zeros compute exactly what a bias-free model computes.
    D = cfg.resolved_head_dim
    for i in range(cfg.num_layers):
      for proj, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
        plan.append((f"model.layers.{i}.self_attn.{proj}_proj.bias", (n * D,), None, i))
  return plan


def _shard_plan(sizes: list[int], max_bytes: int) -> list[int]:
  """Shard number per tensor, in order, starting a new shard when the next tensor would overflow."""
  out, shard, used = [], 0, 0
  for n in sizes:
    if used and used + n > max_bytes:
      shard, used = shard + 1, 0
    out.append(shard)
    used += n
  return out


def _header_bytes(entries: list[tuple[str, tuple[int, ...], int]], st_dtype: str) -> bytes:
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
  offset = 0
  for name, shape, nbytes in entries:
    header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
  return len(raw).to_bytes(8, "little") + raw


def _check_params(params: Mapping[str, Any], cfg: ModelConfig) -> None:
  shapes, _ = param_shapes_and_axes(cfg)
  for m in param_mapping(cfg):
    node = params
    for k in m.path:
      if not isinstance(node, Mapping) or k not in node:
        raise ValueError(f"params has no {'/'.join(m.path)}, which the model config requires "
                         f"(tie_word_embeddings={cfg.tie_word_embeddings}, attention_bias={cfg.attention_bias}).")
      node = node[k]
    want = shapes
    for k in m.path:
      want = want[k]
    if tuple(node.shape) != tuple(want):
      raise ValueError(f"param {'/'.join(m.path)} has shape {tuple(node.shape)}, the model config implies "
                       f"{tuple(want)}.")


def _copy_tokenizer(tokenizer_path, dest: str, bos_token_id, eos_token_id) -> list[str]:
  src = epath.Path(tokenizer_path)
  if not src.exists():
    raise FileNotFoundError(f"tokenizer_path {src} does not exist; pass a tokenizer.json file or an HF tokenizer dir.")
  copied = []
  if src.is_dir():
    for name in TOKENIZER_FILES:
      if (src / name).exists():
        (epath.Path(dest) / name).write_bytes((src / name).read_bytes())
        copied.append(name)
    if not copied:
      raise FileNotFoundError(f"{src} holds none of the tokenizer files {TOKENIZER_FILES}.")
    return copied
  if src.suffix != ".json":
    raise ValueError(f"tokenizer_path {src}: expected a tokenizer.json (HF tokenizers) file or a tokenizer directory.")
  data = src.read_bytes()
  (epath.Path(dest) / "tokenizer.json").write_bytes(data)
  tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
  try:  # name the special tokens when their ids are known, so AutoTokenizer sets bos/eos
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(data.decode())
    for key, tid in (("bos_token", bos_token_id), ("eos_token", eos_token_id)):
      if isinstance(tid, int) and tok.id_to_token(tid) is not None:
        tok_cfg[key] = tok.id_to_token(tid)
  except Exception:  # noqa: BLE001 - names are a convenience; the ids are in config.json anyway
    pass
  (epath.Path(dest) / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
  return ["tokenizer.json", "tokenizer_config.json"]


def export_hf_checkpoint(params: Mapping[str, Any], cfg: ModelConfig, out_dir: str | os.PathLike, *,
                         architecture: str | None = None, tokenizer_path: str | os.PathLike | None = None,
                         max_shard_size_bytes: int = 5 * 2**30, dtype: str = "bfloat16",
                         generation_config: Mapping[str, Any] | None = None, bos_token_id: int | None = None,
                         eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                         overwrite: bool = False, progress: bool | None = None) -> str:
  """Writes `params` (our tree for `cfg`) as an HF checkpoint at `out_dir`; returns `out_dir`.

  Args:
    architecture: LlamaForCausalLM | MistralForCausalLM | Qwen2ForCausalLM (q/k/v biases
      need Qwen2; a sliding window needs Mistral or Qwen2). None: `default_architecture(cfg)`;
      pass the student's source architecture to keep it.
    tokenizer_path: a tokenizer.json file or an HF tokenizer directory to copy along.
    max_shard_size_bytes: above this total, weights go to model-0000k-of-0000n.safetensors
      shards plus model.safetensors.index.json.
    dtype: storage dtype of the weights (bfloat16 rounds to nearest even, as torch does).
    generation_config: written as generation_config.json; default: the token ids.
    overwrite: replace an existing non-empty `out_dir` (only after the new one is complete).
    progress: on process 0, a tqdm bar of tensors and bytes written when True, or when None
      and stderr is a terminal; otherwise an INFO log line (logger "ddk_jax.hf") every ~10%
      of the bytes or 50 tensors.  Other processes report nothing.
  """
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype {dtype!r} is not one of {EXPORT_DTYPES}")
  if max_shard_size_bytes <= 0:
    raise ValueError(f"max_shard_size_bytes must be positive, got {max_shard_size_bytes}")
  cfg.validate()
  architecture = architecture or default_architecture(cfg)
  config_json = hf_config_from_model_config(cfg, architecture, dtype=dtype, bos_token_id=bos_token_id,
                                            eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  _check_params(params, cfg)
  out = epath.Path(out_dir)
  is_writer = jax.process_index() == 0
  # Checked on every process (not just the writer) so no process is left waiting in a gather.
  if not overwrite and out.exists() and any(True for _ in out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) or choose a new path.")

  np_dtype = np.dtype(DTYPES[dtype])
  st_dtype = NP_TO_ST[np_dtype]
  plan = _plan(cfg, architecture)
  sizes = [math.prod(shape) * np_dtype.itemsize for _, shape, _, _ in plan]
  shard_of = _shard_plan(sizes, max_shard_size_bytes)
  num_shards = shard_of[-1] + 1
  file_names = ([SINGLE_FILE] if num_shards == 1 else
                [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)])

  local = "://" not in str(out)
  stage = None
  if is_writer:
    if local:
      out.parent.mkdir(parents=True, exist_ok=True)
      stage = str(out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
      os.makedirs(stage)
    else:
      stage = tempfile.mkdtemp(prefix="ddk_export_")
  bar = None
  try:
    handles: dict[int, Any] = {}
    remaining = [0] * num_shards  # tensors left per shard; a file closes when it reaches 0
    for k in shard_of:
      remaining[k] += 1
    if is_writer:
      for k in range(num_shards):
        entries = [(plan[j][0], plan[j][1], sizes[j]) for j in range(len(plan)) if shard_of[j] == k]
        handles[k] = open(os.path.join(stage, file_names[k]), "wb")
        handles[k].write(_header_bytes(entries, st_dtype))
    gathered_path, gathered = None, None
    bar = TransferProgress(f"HF export {out.name}", len(plan), int(sum(sizes)), progress=progress, logger=_log)
    for j, (name, hf_shape, m, layer) in enumerate(plan):
      if m is None:
        tensor = np.zeros(hf_shape, np_dtype)
      else:
        if gathered_path != m.path:  # gather each param once, on every process (collective)
          node = params
          for key in m.path:
            node = node[key]
          gathered_path, gathered = m.path, _to_host(node)
        per = gathered[layer] if m.stacked else gathered
        # ours = hf.reshape(split).transpose(perm)  =>  hf = ours.transpose(argsort(perm)).reshape(hf_shape)
        tensor = np.ascontiguousarray(per.transpose(np.argsort(m.perm)).reshape(hf_shape)).astype(np_dtype)
      if is_writer:
        data = tensor.tobytes()
        assert len(data) == sizes[j], (name, len(data), sizes[j])
        k = shard_of[j]
        handles[k].write(data)
        remaining[k] -= 1
        if remaining[k] == 0:
          handles.pop(k).close()
      bar.update(1, sizes[j])
    bar.close()
    gathered = None
    if is_writer:
      for h in handles.values():
        h.close()
      if num_shards > 1:
        index = {"metadata": {"total_size": int(sum(sizes))},
                 "weight_map": {name: file_names[shard_of[j]] for j, (name, *_rest) in enumerate(plan)}}
        with open(os.path.join(stage, INDEX_FILE), "w") as f:
          json.dump(index, f, indent=2, sort_keys=True)
      gen = dict(generation_config) if generation_config is not None else {
          "_from_model_config": True,
          **{k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                               ("pad_token_id", pad_token_id)) if v is not None}}
      with open(os.path.join(stage, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
      if tokenizer_path is not None:
        _copy_tokenizer(tokenizer_path, stage, bos_token_id, eos_token_id)
      with open(os.path.join(stage, CONFIG_FILE), "w") as f:
        json.dump(config_json, f, indent=2)
      _publish(stage, out, overwrite, local)
      stage = None
  finally:
    if bar is not None:
      bar.close(ok=False)  # a no-op after a finished export; on failure, ends the bar without a "done" line
    if stage is not None:  # failure: leave nothing half-written behind
      shutil.rmtree(stage, ignore_errors=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ddk_jax_hf_export_done")
  return str(out)


def _publish(stage: str, out: epath.Path, overwrite: bool, local: bool) -> None:
  if local:
    old = None
    if out.exists():
      if any(True for _ in out.iterdir()):
        old = str(out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)  # overwrite was checked by the caller
      else:
        out.rmdir()
    os.rename(stage, out)  # atomic on one filesystem
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return
  # Object stores have no directory rename: upload, config.json last, so a partial upload
  # is visibly incomplete (the importer requires config.json).
  if overwrite and out.exists():
    out.rmtree()
  out.mkdir(parents=True, exist_ok=True)
  names = sorted(os.listdir(stage), key=lambda n: n == CONFIG_FILE)
  for name in names:
    epath.Path(stage, name).copy(out / name, overwrite=True)
  shutil.rmtree(stage, ignore_errors=True)
