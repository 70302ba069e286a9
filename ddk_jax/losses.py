"""Naive (reference) CE + KD token losses and per-domain reductions.

Convention (the loss contract, see docs/loss.md):

* ``ce_tok = -log softmax(z_S)[target]`` with ``z_S = h_S @ W_S``.
* ``kl_tok = T^2 * KL(softmax(z_T / T) || softmax(z_S / T))`` with ``z_T = h_T @ W_T``.
  The ``T^2`` factor (Hinton et al.) keeps the KL gradient's magnitude roughly
  independent of the temperature, so ``gamma`` need not be retuned with ``T``.
* Both are float32 ``[B, S]`` and exactly zero where ``mask == 0``.
* The training loss averages over non-padding target tokens:
  ``loss = (sum(ce_tok) + gamma * sum(kl_tok)) / count`` where
  ``count = sum(mask != 0)`` over the (global) batch.

This module materialises the full ``[B, S, V]`` fp32 logits of both models; it is
the readable reference. ``ddk_jax.chunked_loss`` computes the same numbers chunk
by chunk without ever holding a ``[tokens, V]`` buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  "logits_f32",
  "kd_token_losses",
  "kd_token_losses_from_logits",
  "per_domain_sums",
]


def loss_dtype(*xs) -> jnp.dtype:
  """float32, or float64 when an input is float64 (only under x64, for tests)."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*xs))


def logits_f32(hidden: jax.Array, head: jax.Array) -> jax.Array:
  """``hidden [..., H] @ head [H, V]`` accumulated and returned in float32.

  With bf16 inputs this is a bf16 matmul with fp32 accumulation (fast on CPU,
  GPU and TPU); the fp32 output keeps the softmax that follows accurate.
  float64 inputs (tests under x64) stay float64.
  """
  return jax.lax.dot_general(
    hidden,
    head,
    (((hidden.ndim - 1,), (0,)), ((), ())),
    preferred_element_type=loss_dtype(hidden, head),
  )


def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  # Compare against an iota instead of gathering: no out-of-range indexing for
  # garbage targets at padding, and it partitions cleanly when V is sharded.
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  hit = vocab_ids == targets[..., None].astype(jnp.int32)
  return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def kd_token_losses_from_logits(student_logits: jax.Array, teacher_logits: jax.Array | None,
    targets: jax.Array, mask: jax.Array, *, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Per-token CE and ``T^2``-scaled KL from logits.

  Args:
    student_logits: ``[B, S, V]`` (any float dtype; computed in float32).
    teacher_logits: ``[B, S, V]`` or ``None`` (then ``kl_tok`` is zeros). It is
    wrapped in ``stop_gradient``: the teacher is frozen.
    targets: ``[B, S]`` int next-token ids (any value where ``mask == 0``).
    mask: ``[B, S]``; a token counts iff ``mask != 0``.
    temperature: distillation temperature ``T > 0``.

  Returns:
    ``(ce_tok, kl_tok)``, float32 ``[B, S]``, zero where ``mask == 0``.
  """
  valid = mask != 0
  z_s = student_logits.astype(loss_dtype(student_logits))
  ce = jax.nn.logsumexp(z_s, axis=-1) - _target_logit(z_s, targets)
  ce_tok = jnp.where(valid, ce, 0.0)
  if teacher_logits is None:
    return ce_tok, jnp.zeros_like(ce_tok)
  t = float(temperature)
  z_t = jax.lax.stop_gradient(teacher_logits).astype(z_s.dtype)
  log_p = jax.nn.log_softmax(z_t / t, axis=-1)  # teacher, at temperature T
  log_q = jax.nn.log_softmax(z_s / t, axis=-1)  # student, at temperature T
  kl = (t * t) * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  kl_tok = jnp.where(valid, kl, 0.0)
  return ce_tok, kl_tok


def kd_token_losses(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array | None,
    teacher_head: jax.Array | None, targets: jax.Array, mask: jax.Array, *,
    temperature: float) -> tuple[jax.Array, jax.Array]:
  """Naive CE + KD token losses from final hidden states and head weights.

  Args:
    student_hidden: ``[B, S, H]`` final (normed) hidden states, any float dtype.
    student_head: ``[H, V]`` output projection.
    teacher_hidden: ``[B, S, Ht]`` or ``None``.
    teacher_head: ``[Ht, V]`` or ``None`` (both ``None`` or neither).
    targets, mask, temperature: as in ``kd_token_losses_from_logits``.

  Returns:
    ``(ce_tok, kl_tok)``, float32 ``[B, S]``, zero where ``mask == 0``. The
    caller forms ``(sum(ce_tok) + gamma * sum(kl_tok)) / count``.
  """
  if (teacher_hidden is None) != (teacher_head is None):
    raise ValueError("teacher_hidden and teacher_head must both be given or both be None")
  z_s = logits_f32(student_hidden, student_head)
  z_t = None
  if teacher_hidden is not None:
    z_t = logits_f32(
      jax.lax.stop_gradient(teacher_hidden), jax.lax.stop_gradient(teacher_head)
    )
  return kd_token_losses_from_logits(z_s, z_t, targets, mask, temperature=temperature)


def per_domain_sums(values_tok: jax.Array, mask: jax.Array, domain_id: jax.Array,
    num_domains: int) -> tuple[jax.Array, jax.Array]:
  """Sum of ``values_tok`` and count of valid tokens per domain.

  Args:
    values_tok: ``[B, S]`` per-token values (e.g. ``ce_tok``).
    mask: ``[B, S]``; a token counts iff ``mask != 0``.
    domain_id: ``[B]`` int domain of each row (rows are packed within a domain).
    num_domains: static number of domains ``N``.

  Returns:
    ``(sums, counts)``, float32 ``[N]``. Ids outside ``[0, N)`` are dropped.
    Returning (sum, count) pairs rather than means lets hosts/devices reduce
    them exactly before dividing.
  """
  valid = mask != 0
  row_sums = jnp.sum(jnp.where(valid, values_tok.astype(jnp.float32), 0.0), axis=-1)
  row_counts = jnp.sum(valid, axis=-1).astype(jnp.float32)
  member = domain_id.astype(jnp.int32)[:, None] == jnp.arange(num_domains)[None, :]
  # [B, N] one-hot contraction for the finite rows; a non-finite row is added to its own
  # domain only (in the product it would be 0 * inf = nan in every other domain, and the
  # error would name the wrong domain).
  finite = jnp.isfinite(row_sums)
  onehot = member.astype(jnp.float32)
  sums = jnp.einsum("b,bn->n", jnp.where(finite, row_sums, 0.0), onehot, precision=jax.lax.Precision.HIGHEST)
  sums = sums + jnp.sum(jnp.where(member & ~finite[:, None], row_sums[:, None], 0.0), axis=0)
  counts = jnp.einsum("b,bn->n", row_counts, onehot, precision=jax.lax.Precision.HIGHEST)
  return sums, counts
