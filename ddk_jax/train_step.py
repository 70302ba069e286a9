"""The jitted KD train step and the per-domain eval step.

Train step, per micro-batch: the teacher forward (frozen, no gradient, outside
`value_and_grad`), then the student forward/backward of
`(sum CE + gamma * sum T^2 KL) / global non-padding target tokens`.  Gradients of
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


@dataclasses.dataclass(frozen=True)
class StepOptions:
  num_domains: int
  mode: str = "ddk"
  gamma: float = 1.0
  temperature: float = 1.0
  grad_accum: int = 1
  loss_impl: str = "chunked"
  loss_chunk_size: int = 0  # 0: chosen from the vocab size

  @property
  def uses_teacher(self) -> bool:
    return self.mode != "cpt"


def token_loss_fn(opts: StepOptions) -> Callable:
  if opts.loss_impl == "naive":
    return functools.partial(losses.kd_token_losses, temperature=opts.temperature)
  if opts.loss_impl == "chunked":
    from ddk_jax import chunked_loss  # local import: the reference path does not need it
    kwargs = {"chunk_size": opts.loss_chunk_size} if opts.loss_chunk_size else {}
    return functools.partial(chunked_loss.chunked_kd_token_losses, temperature=opts.temperature, **kwargs)
  raise ValueError(f"loss.impl={opts.loss_impl!r} is not one of {LOSS_IMPLS}")


def training_loss_sum_fn(opts: StepOptions) -> Callable | None:
  """`f(hidden, head, t_hidden, t_head, targets, mask) -> (sum CE + gamma sum KL, (ce_tok, kl_tok))`

  for implementations with a fused training form (the chunked loss); None otherwise.
  """
  if opts.loss_impl != "chunked":
    return None
  from ddk_jax import chunked_loss
  kwargs = {"chunk_size": opts.loss_chunk_size} if opts.loss_chunk_size else {}
  return functools.partial(chunked_loss.chunked_kd_loss_sum, temperature=opts.temperature, gamma=opts.gamma,
                           **kwargs)


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
  """Returns `step(state, teacher_params, batch) -> (state, metrics)` (not yet jitted)."""
  token_losses = token_loss_fn(opts)
  loss_sum = training_loss_sum_fn(opts)
  use_teacher = opts.uses_teacher

  def micro_step(params, teacher_params, mb, total_tokens):
    mask = (mb["segment_ids"] != 0)
    if use_teacher:
      # Named scopes only label the ops in profiles (teacher / student / kd_loss / optimizer).
      with jax.named_scope("teacher"):
        t_hidden = model_lib.apply_hidden(teacher_params, teacher_cfg, mb["inputs"], mb["positions"],
                                          mb["segment_ids"])
      t_hidden = jax.lax.stop_gradient(t_hidden)
      t_head = model_lib.head_weight(teacher_params, teacher_cfg)
      # A teacher may pad its vocab beyond the shared tokenizer (Qwen1.5-14B: 152064 vs
      # 1.8B: 151936); ids past the student's vocab are never targets, so they are dropped.
      t_head = jax.lax.stop_gradient(t_head[:, :student_cfg.vocab_size])
    else:
      t_hidden = t_head = None

    def loss_fn(p):
      with jax.named_scope("student"):
        hidden = model_lib.apply_hidden(p, student_cfg, mb["inputs"], mb["positions"], mb["segment_ids"])
        head = model_lib.head_weight(p, student_cfg)
      if loss_sum is not None:
        # Training form of the chunked loss: the gradient is formed in the same pass over
        # the chunks as the values (4 head matmuls, no logits recomputed in the backward).
        with jax.named_scope("kd_loss"):
          total, (ce_tok, kl_tok) = loss_sum(hidden, head, t_hidden, t_head, mb["targets"], mask)
        return total / total_tokens, (ce_tok, kl_tok)
      with jax.named_scope("kd_loss"):
        ce_tok, kl_tok = token_losses(hidden, head, t_hidden, t_head, mb["targets"], mask)
      loss = (jnp.sum(ce_tok) + opts.gamma * jnp.sum(kl_tok)) / total_tokens
      return loss, (ce_tok, kl_tok)

    (loss, (ce_tok, kl_tok)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    ce_dom, count_dom = losses.per_domain_sums(ce_tok, mask, mb["domain_id"], opts.num_domains)
    kl_dom, _ = losses.per_domain_sums(kl_tok, mask, mb["domain_id"], opts.num_domains)
    return grads, loss, ce_dom, kl_dom, count_dom

  def step(state, teacher_params, batch):
    params = state["params"]
    total_tokens = jnp.maximum(jnp.sum(batch["segment_ids"] != 0), 1).astype(jnp.float32)
    if opts.grad_accum == 1:
      grads, loss, ce_dom, kl_dom, count_dom = micro_step(params, teacher_params, batch, total_tokens)
    else:
      def body(carry, mb):
        g_acc, l_acc, ce_acc, kl_acc, n_acc = carry
        g, l, ce, kl, n = micro_step(params, teacher_params, mb, total_tokens)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, ce_acc + ce, kl_acc + kl, n_acc + n), None

      zeros_d = jnp.zeros((opts.num_domains,), jnp.float32)
      init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros((), jnp.float32),
              zeros_d, zeros_d, zeros_d)
      (grads, loss, ce_dom, kl_dom, count_dom), _ = jax.lax.scan(body, init, _micro_batches(batch, opts.grad_accum))
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
    }
    return new_state, metrics

  return step


def make_eval_step(cfg: ModelConfig, opts: StepOptions, vocab_size: int | None = None) -> Callable:
  """`eval(params, batch) -> (ce_sum[num_domains], count[num_domains])`; plain CE, no KD.

  Used for the student's and (once, cached) the teacher's per-domain validation loss.
  `vocab_size` keeps the first logits only: a teacher padded beyond the shared tokenizer is
  scored on the same vocabulary the KD term uses.
  """
  token_losses = token_loss_fn(opts)

  def eval_step(params, batch):
    mask = batch["segment_ids"] != 0
    hidden = model_lib.apply_hidden(params, cfg, batch["inputs"], batch["positions"], batch["segment_ids"])
    head = model_lib.head_weight(params, cfg)
    if vocab_size is not None:
      head = head[:, :vocab_size]
    ce_tok, _ = token_losses(hidden, head, None, None, batch["targets"], mask)
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


def batch_shardings(mesh: Mesh, rules) -> dict:
  return {k: sharding.batch_sharding(mesh, rules, 1 if k == "domain_id" else 2) for k in ROW_KEYS}


def jit_train_step(step: Callable, state_sh: dict, teacher_sh: Any, mesh: Mesh, rules) -> Callable:
  replicated = NamedSharding(mesh, P())

  def wrapped(state, teacher_params, batch):
    with sharding.activation_sharding(mesh, rules):
      return step(state, teacher_params, batch)

  return jax.jit(wrapped, in_shardings=(state_sh, teacher_sh, batch_shardings(mesh, rules)),
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
