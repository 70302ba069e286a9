"""The jitted KD train step and the per-domain eval step.

Train step, per micro-batch: the teacher forward (frozen, no gradient, outside
`value_and_grad`), then the student forward/backward of
`(sum CE + gamma * sum T^2 D(P||Q)) / global non-padding target tokens`, with the divergence
D, gamma and T (and their schedules) given by `StepOptions.loss` (a `LossSpec`).  Gradients of
micro-batches are summed (each already divided by the whole batch's token count, so
accumulation is exactly the big-batch gradient), clipped and applied with optax.  A
non-finite loss or gradient leaves params and optimizer state untouched and is reported.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddk_jax import losses, model as model_lib, sharding
from ddk_jax.data.pipeline import ROW_KEYS
from ddk_jax.model import ModelConfig

LOSS_IMPLS = ("chunked", "naive")
SCHEDULES = ("constant", "linear", "cosine")


def schedule_value(kind: str, start: float, end: float | None, step: jax.Array | int, steps: int):
  """A loss hyper-parameter at optimizer step ``step``: ``start`` at step 0, ``end`` at ``steps``.

  ``constant``: ``start`` as a Python float (a compile-time constant). ``linear`` and
  ``cosine`` (half a cosine from ``start`` down or up to ``end``) are float32 scalars
  computed from ``step`` inside the jitted step, held at ``end`` after ``steps``.
  """
  if kind == "constant":
    return float(start)
  if kind not in SCHEDULES:
    raise ValueError(f"schedule {kind!r} is not one of {', '.join(SCHEDULES)}")
  if end is None:
    raise ValueError(f"a {kind} schedule needs an end value")
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / float(max(int(steps), 1)), 0.0, 1.0)
  start, end = jnp.float32(start), jnp.float32(end)
  if kind == "linear":
    return start + (end - start) * frac
  return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The training loss and its parameters: one static, hashable object.

  ``token_losses`` and ``loss_sum`` run the configured implementation (``impl``) with the
  configured divergence; ``hyper(step)`` gives ``(gamma, temperature)`` at a step (Python
  floats for constant schedules, so a default run compiles exactly the step it always did).
  ``valid_vocab`` (0: the student's vocab size) is the tokenizer's size: vocabulary rows
  past it (embedding padding) get no probability mass in the CE or the divergence.
  ``schedule_steps`` is the length of the gamma/temperature schedules (the run's ``steps``).
  """

  impl: str = "chunked"
  chunk_size: int = 0  # 0: chosen from the vocab size
  divergence: str = "forward_kl"
  jsd_beta: float = 0.5
  skew_alpha: float = 0.1
  akl_mu: float = 0.5
  gamma: float = 1.0
  gamma_schedule: str = "constant"
  gamma_end: float | None = None
  temperature: float = 1.0
  temperature_schedule: str = "constant"
  temperature_end: float | None = None
  schedule_steps: int = 0
  valid_vocab: int = 0

  def __post_init__(self):
    if self.impl not in LOSS_IMPLS:
      raise ValueError(f"loss.impl={self.impl!r} is not one of {LOSS_IMPLS}")
    for kind in (self.gamma_schedule, self.temperature_schedule):
      if kind not in SCHEDULES:
        raise ValueError(f"schedule {kind!r} is not one of {SCHEDULES}")
    self.divergence_spec  # raises ValueError for an unknown divergence or a parameter out of range

  @classmethod
  def from_settings(cls, loss: Any, *, steps: int, valid_vocab: int = 0) -> LossSpec:
    """From ``Settings.loss`` (``ddk_jax.settings.LossSettings``), the run's steps and
    the tokenizer's size."""
    return cls(impl=loss.impl, chunk_size=loss.chunk_size, divergence=loss.divergence, jsd_beta=loss.jsd_beta,
               skew_alpha=loss.skew_alpha, akl_mu=loss.akl_mu, gamma=loss.gamma, gamma_schedule=loss.gamma_schedule,
               gamma_end=loss.gamma_end, temperature=loss.temperature,
               temperature_schedule=loss.temperature_schedule, temperature_end=loss.temperature_end,
               schedule_steps=steps, valid_vocab=valid_vocab)

  @property
  def divergence_spec(self) -> losses.Divergence:
    return losses.Divergence(self.divergence, jsd_beta=self.jsd_beta, skew_alpha=self.skew_alpha,
                             akl_mu=self.akl_mu)

  @property
  def scheduled(self) -> bool:
    return self.gamma_schedule != "constant" or self.temperature_schedule != "constant"

  def hyper(self, step: jax.Array | int = 0) -> tuple[Any, Any]:
    """``(gamma, temperature)`` in effect at optimizer step ``step`` (0-based)."""
    return (schedule_value(self.gamma_schedule, self.gamma, self.gamma_end, step, self.schedule_steps),
            schedule_value(self.temperature_schedule, self.temperature, self.temperature_end, step,
                           self.schedule_steps))

  def _kwargs(self, head: jax.Array) -> dict:
    kw = {"divergence": self.divergence_spec}
    if self.valid_vocab > head.shape[1]:
      raise ValueError(f"valid_vocab={self.valid_vocab} exceeds the model's vocab {head.shape[1]}")
    if 0 < self.valid_vocab < head.shape[1]:
      kw["valid_vocab"] = int(self.valid_vocab)
    if self.impl == "chunked" and self.chunk_size:
      kw["chunk_size"] = self.chunk_size
    return kw

  def token_losses(self, hidden, head, t_hidden, t_head, targets, mask, *, temperature=None):
    """``(ce_tok, kl_tok)`` (``kl_tok``: the T^2-scaled divergence), differentiable per token."""
    temperature = self.temperature if temperature is None else temperature
    if self.impl == "naive":
      fn = losses.kd_token_losses
    else:
      from ddk_jax import chunked_loss  # local import: the reference path does not need it
      fn = chunked_loss.chunked_kd_token_losses
    return fn(hidden, head, t_hidden, t_head, targets, mask, temperature=temperature, **self._kwargs(head))

  def loss_sum(self, hidden, head, t_hidden, t_head, targets, mask, *, gamma=None, temperature=None,
               teacher_ce=False):
    """``(sum(ce_tok) + gamma * sum(kl_tok), (ce_tok, kl_tok))``: the training form.

    The chunked implementation forms the gradient in the same pass as the values (4 head
    matmuls, nothing recomputed in the backward); its per-token outputs are metrics only.
    ``teacher_ce=True`` adds the teacher's own per-token CE at the target (untempered, on the
    vocabulary of the student's CE, as the eval step scores it) as a third per-token output.
    """
    gamma = self.gamma if gamma is None else gamma
    temperature = self.temperature if temperature is None else temperature
    if self.impl == "chunked":
      from ddk_jax import chunked_loss
      kw = {"teacher_ce": True} if teacher_ce else {}
      return chunked_loss.chunked_kd_loss_sum(hidden, head, t_hidden, t_head, targets, mask,
                                              temperature=temperature, gamma=gamma, **self._kwargs(head), **kw)
    ce_tok, kl_tok = self.token_losses(hidden, head, t_hidden, t_head, targets, mask, temperature=temperature)
    total = jnp.sum(ce_tok) + gamma * jnp.sum(kl_tok)
    if not teacher_ce:
      return total, (ce_tok, kl_tok)
    t_ce, _ = losses.kd_token_losses(t_hidden, t_head[:, :head.shape[1]], None, None, targets, mask, temperature=1.0,
                                     **self._kwargs(head))
    return total, (ce_tok, kl_tok, jax.lax.stop_gradient(t_ce))

  def loss_sum_cached(self, hidden, head, cached: losses.CachedTeacher, targets, mask, *, gamma=None,
                      temperature=None):
    """``loss_sum`` with the teacher read from a top-k cache (``losses.CachedTeacher``): the KD term
    over the cache's k+1 buckets (docs/teacher_cache.md); only the divergences of
    ``losses.CACHE_DIVERGENCES``."""
    gamma = self.gamma if gamma is None else gamma
    temperature = self.temperature if temperature is None else temperature
    kw = self._kwargs(head)
    if self.impl == "chunked":
      from ddk_jax import chunked_loss
      return chunked_loss.chunked_kd_loss_sum_cached(hidden, head, cached, targets, mask, temperature=temperature,
                                                     gamma=gamma, **kw)
    kw.pop("chunk_size", None)
    ce_tok, kl_tok = losses.kd_token_losses_cached(hidden, head, cached, targets, mask, temperature=temperature, **kw)
    return jnp.sum(ce_tok) + gamma * jnp.sum(kl_tok), (ce_tok, kl_tok)


_LEGACY_LOSS_FIELDS = {"gamma": "gamma", "temperature": "temperature", "loss_impl": "impl",
                       "loss_chunk_size": "chunk_size"}


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train and eval steps do. The loss lives in ``loss`` (a ``LossSpec``).

  ``gamma``, ``temperature``, ``loss_impl`` and ``loss_chunk_size`` are shorthands for a
  forward-KL loss without schedules: given without ``loss``, they build it; given with it,
  they must agree with it; afterwards they mirror it.
  """
  num_domains: int
  mode: str = "ddk"
  gamma: float = 1.0
  temperature: float = 1.0
  grad_accum: int = 1
  loss_impl: str = "chunked"
  loss_chunk_size: int = 0  # 0: chosen from the vocab size
  loss: LossSpec | None = None
  # The teacher comes from a top-k cache in the batch (CACHE_KEYS) instead of a forward pass.
  teacher_cache: bool = False

  def __post_init__(self):
    if self.loss is None:
      object.__setattr__(self, "loss", LossSpec(gamma=float(self.gamma), temperature=float(self.temperature),
                                                impl=self.loss_impl, chunk_size=int(self.loss_chunk_size)))
      return
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for mine, theirs in _LEGACY_LOSS_FIELDS.items():
      value, wanted = getattr(self, mine), getattr(self.loss, theirs)
      if value != wanted and value != defaults[mine]:
        raise ValueError(f"StepOptions.{mine}={value!r} contradicts loss.{theirs}={wanted!r}; give only `loss`")
      object.__setattr__(self, mine, wanted)

  @property
  def uses_teacher(self) -> bool:
    return self.mode != "cpt"


def _micro_batches(batch: dict, accum: int) -> dict:
  """[B, ...] -> [accum, B/accum, ...] with micro-batch i = rows i, i+accum, ...

  Strided (not contiguous) so every micro-batch keeps rows on every data-parallel shard.
  """
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> dict:
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": optimizer.init(params),
      "skipped_steps": jnp.zeros((), jnp.int32),
  }


def make_train_step(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None,
                    optimizer: optax.GradientTransformation, opts: StepOptions) -> Callable:
  """Returns `step(state, teacher_params, batch) -> (state, metrics)` (not yet jitted).

  gamma and T come from `opts.loss.hyper(state["step"])`: compile-time constants for
  constant schedules, values computed in the step otherwise (one compiled step for every
  value). The metrics report the values in effect (`gamma`, `temperature`).
  """
  spec = opts.loss
  use_teacher = opts.uses_teacher
  # The step also reports the teacher's CE at the targets, per domain: the controller's train
  # signal (docs/ddk.md). A cached teacher gives it from the cached log-probability of each target.
  teacher_ce = use_teacher

  def micro_step(params, teacher_params, mb, total_tokens, gamma, temperature):
    mask = (mb["segment_ids"] != 0)
    if use_teacher and not opts.teacher_cache:
      # Named scopes only label the ops in profiles (teacher / student / kd_loss / optimizer).
      with jax.named_scope("teacher"):
        t_hidden = model_lib.apply_hidden(teacher_params, teacher_cfg, mb["inputs"], mb["positions"],
                                          mb["segment_ids"])
      t_hidden = jax.lax.stop_gradient(t_hidden)
      # A teacher may pad its vocab differently over the shared tokenizer (Qwen1.5-14B:
      # 152064 vs 1.8B: 151936); the loss uses the rows of the tokenizer's ids only.
      t_head = jax.lax.stop_gradient(model_lib.head_weight(teacher_params, teacher_cfg))
    else:
      t_hidden = t_head = None

    def loss_fn(p):
      with jax.named_scope("student"):
        hidden = model_lib.apply_hidden(p, student_cfg, mb["inputs"], mb["positions"], mb["segment_ids"])
        head = model_lib.head_weight(p, student_cfg)
      t_ce_tok = []
      with jax.named_scope("kd_loss"):
        if use_teacher and opts.teacher_cache:
          cached = losses.CachedTeacher(mb["teacher_ids"], mb["teacher_logp"], mb["teacher_tail"])
          total, (ce_tok, kl_tok) = spec.loss_sum_cached(hidden, head, cached, mb["targets"], mask, gamma=gamma,
                                                         temperature=temperature)
          t_ce_tok = [jnp.where(mask, -mb["teacher_target"].astype(jnp.float32), 0.0)]
        else:
          total, (ce_tok, kl_tok, *t_ce_tok) = spec.loss_sum(hidden, head, t_hidden, t_head, mb["targets"], mask,
                                                             gamma=gamma, temperature=temperature,
                                                             teacher_ce=teacher_ce)
      return total / total_tokens, (ce_tok, kl_tok, *t_ce_tok)

    (loss, (ce_tok, kl_tok, *t_ce_tok)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    ce_dom, count_dom = losses.per_domain_sums(ce_tok, mask, mb["domain_id"], opts.num_domains)
    kl_dom, _ = losses.per_domain_sums(kl_tok, mask, mb["domain_id"], opts.num_domains)
    t_ce_dom = losses.per_domain_sums(t_ce_tok[0], mask, mb["domain_id"], opts.num_domains)[0] if teacher_ce else ()
    return grads, loss, ce_dom, kl_dom, count_dom, t_ce_dom

  def step(state, teacher_params, batch):
    params = state["params"]
    total_tokens = jnp.maximum(jnp.sum(batch["segment_ids"] != 0), 1).astype(jnp.float32)
    gamma, temperature = spec.hyper(state["step"])
    if opts.grad_accum == 1:
      grads, loss, ce_dom, kl_dom, count_dom, t_ce_dom = micro_step(params, teacher_params, batch, total_tokens,
                                                                    gamma, temperature)
    else:
      def body(carry, mb):
        g_acc, l_acc, ce_acc, kl_acc, n_acc, t_acc = carry
        g, l, ce, kl, n, t_ce = micro_step(params, teacher_params, mb, total_tokens, gamma, temperature)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, ce_acc + ce, kl_acc + kl, n_acc + n,
                jax.tree.map(jnp.add, t_acc, t_ce)), None

      zeros_d = jnp.zeros((opts.num_domains,), jnp.float32)
      init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros((), jnp.float32),
              zeros_d, zeros_d, zeros_d, zeros_d if teacher_ce else ())
      (grads, loss, ce_dom, kl_dom, count_dom, t_ce_dom), _ = jax.lax.scan(body, init,
                                                                           _micro_batches(batch, opts.grad_accum))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    with jax.named_scope("optimizer"):
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, new_opt_state = optimizer.update(grads, state["opt_state"], params)
      new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32),
    }
    n = jnp.maximum(jnp.sum(count_dom), 1.0)
    metrics = {
        "loss": loss,
        "ce": jnp.sum(ce_dom) / n,
        "kl": jnp.sum(kl_dom) / n,
        "grad_norm": grad_norm,
        "finite": finite,
        "tokens": jnp.sum(count_dom),
        "domain_ce_sum": ce_dom,
        "domain_kl_sum": kl_dom,
        "domain_count": count_dom,
        "gamma": jnp.asarray(gamma, jnp.float32),
        "temperature": jnp.asarray(temperature, jnp.float32),
    }
    if teacher_ce:
      metrics["domain_teacher_ce_sum"] = t_ce_dom  # the teacher's CE on the batch's targets, per domain
    return new_state, metrics

  return step


def make_eval_step(cfg: ModelConfig, opts: StepOptions, vocab_size: int | None = None) -> Callable:
  """`eval(params, batch) -> (ce_sum[num_domains], count[num_domains])`; plain CE, no KD.

  Used for the student's and (once, cached) the teacher's per-domain validation loss.
  `vocab_size` keeps the first logits only, and `opts.loss.valid_vocab` (the tokenizer's
  size) masks the rest: both models are scored on the vocabulary the training loss uses,
  and the padded rows of their embeddings never receive probability mass.
  """
  spec = opts.loss

  def eval_step(params, batch):
    mask = batch["segment_ids"] != 0
    hidden = model_lib.apply_hidden(params, cfg, batch["inputs"], batch["positions"], batch["segment_ids"])
    head = model_lib.head_weight(params, cfg)
    if vocab_size is not None:
      head = head[:, :vocab_size]
    ce_tok, _ = spec.token_losses(hidden, head, None, None, batch["targets"], mask)
    return losses.per_domain_sums(ce_tok, mask, batch["domain_id"], opts.num_domains)
  return eval_step


# ---- sharded compilation -------------------------------------------------------------


def params_shardings(cfg: ModelConfig, mesh: Mesh, rules) -> Any:
  shapes, axes = model_lib.param_shapes_and_axes(cfg)
  shape_tree = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                            is_leaf=lambda x: isinstance(x, tuple))
  return sharding.tree_shardings(axes, shape_tree, mesh, rules)


def state_shardings(params_sh: Any, optimizer: optax.GradientTransformation, abstract_params: Any,
                    mesh: Mesh) -> dict:
  """Optimizer moments follow their params' shardings; scalars are replicated."""
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, params_sh,
                                 transform_non_params=lambda _: replicated)
  return {"step": replicated, "params": params_sh, "opt_state": opt_sh, "skipped_steps": replicated}


# Batch keys a cached teacher adds to the rows (ddk_jax.teacher_cache), with their ranks in a batch: the row's
# index in its domain's packed row stream, the teacher's top-k ids and log-probabilities, its tail log-mass and
# its log-probability of each target.
CACHE_KEYS = {"cache_row": 1, "teacher_ids": 3, "teacher_logp": 3, "teacher_tail": 2, "teacher_target": 2}


def batch_shardings(mesh: Mesh, rules, teacher_cache: bool = False) -> dict:
  out = {k: sharding.batch_sharding(mesh, rules, 1 if k == "domain_id" else 2) for k in ROW_KEYS}
  if teacher_cache:
    out |= {k: sharding.batch_sharding(mesh, rules, ndim) for k, ndim in CACHE_KEYS.items()}
  return out


def jit_train_step(step: Callable, state_sh: dict, teacher_sh: Any, mesh: Mesh, rules,
                   teacher_cache: bool = False) -> Callable:
  replicated = NamedSharding(mesh, P())

  def wrapped(state, teacher_params, batch):
    with sharding.activation_sharding(mesh, rules):
      return step(state, teacher_params, batch)

  return jax.jit(wrapped, in_shardings=(state_sh, teacher_sh, batch_shardings(mesh, rules, teacher_cache)),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))


def jit_eval_step(eval_step: Callable, params_sh: Any, mesh: Mesh, rules) -> Callable:
  replicated = NamedSharding(mesh, P())

  def wrapped(params, batch):
    with sharding.activation_sharding(mesh, rules):
      return eval_step(params, batch)

  return jax.jit(wrapped, in_shardings=(params_sh, batch_shardings(mesh, rules)), out_shardings=replicated)


def init_params_sharded(cfg: ModelConfig, key: jax.Array, params_sh: Any) -> Any:
  """Random init directly into the target shardings (never a full copy on one device)."""
  return jax.jit(functools.partial(model_lib.init_params, cfg), out_shardings=params_sh)(key)
