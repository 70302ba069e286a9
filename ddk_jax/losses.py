"""Naive (reference) CE + KD token losses and per-domain reductions.

Convention (the loss contract, see docs/loss.md):

* ``ce_tok = -log softmax(z_S)[target]`` with ``z_S = h_S @ W_S``.
* ``kl_tok = T^2 * D(P || Q)`` with ``P = softmax(z_T / T)`` (teacher, ``z_T = h_T @ W_T``),
  ``Q = softmax(z_S / T)`` and ``D`` the configured divergence (``Divergence``; the
  default is the forward KL ``KL(P || Q)``). The ``T^2`` factor (Hinton et al.) keeps
  the gradient's magnitude roughly independent of the temperature, so ``gamma`` need
  not be retuned with ``T``.
* With ``valid_vocab = n``, only the first ``n`` logits of each model count (the rest
  are rows an embedding is padded with beyond the tokenizer's vocabulary): they get
  no probability mass in the CE or in ``D``, and no gradient.
* Both are float32 ``[B, S]`` and exactly zero where ``mask == 0``.
* The training loss averages over non-padding target tokens:
  ``loss = (sum(ce_tok) + gamma * sum(kl_tok)) / count`` where
  ``count = sum(mask != 0)`` over the (global) batch.

This module materialises the full ``[B, S, V]`` fp32 logits of both models and lets
autodiff form the gradients; it is the readable reference. ``ddk_jax.chunked_loss``
computes the same numbers chunk by chunk, with hand-written gradients, without ever
holding a ``[tokens, V]`` buffer.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  "DIVERGENCES",
  "Divergence",
  "as_divergence",
  "divergence_from_log_probs",
  "akl_weights",
  "logits_f32",
  "kd_token_losses",
  "kd_token_losses_from_logits",
  "per_domain_sums",
  "CachedTeacher",
  "CACHE_DIVERGENCES",
  "check_cache_divergence",
  "cached_bucket_log_probs",
  "kd_token_losses_cached",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "akl")


@dataclasses.dataclass(frozen=True)
class Divergence:
  """Which ``D(P || Q)`` the KD term uses, and its parameter (static, hashable).

  With ``P`` the teacher's and ``Q`` the student's tempered distribution:

  * ``forward_kl``: ``KL(P || Q) = sum P log(P / Q)``.
  * ``reverse_kl``: ``KL(Q || P)``.
  * ``jsd``: ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``,
    ``beta = jsd_beta`` in (0, 1); 0.5 is the Jensen-Shannon divergence. As
    ``beta -> 0`` it vanishes like ``beta KL(P || Q)`` (so ``JSD / beta -> forward KL``),
    as ``beta -> 1`` like ``(1 - beta) KL(Q || P)`` (``JSD / (1 - beta) -> reverse KL``).
  * ``tvd``: total variation ``0.5 sum |P - Q|``.
  * ``skew_forward_kl``: ``KL(P || a P + (1 - a) Q)``, ``a = skew_alpha`` in [0, 1).
  * ``skew_reverse_kl``: ``KL(Q || a Q + (1 - a) P)``.
  * ``akl``: ``w_head KL(P || Q) + w_tail KL(Q || P)`` (adaptive KL), the weights from
    the teacher's head/tail gaps with threshold ``akl_mu`` (``akl_weights``).
  """

  name: str = "forward_kl"
  jsd_beta: float = 0.5
  skew_alpha: float = 0.1
  akl_mu: float = 0.5

  def __post_init__(self):
    if self.name not in DIVERGENCES:
      raise ValueError(f"divergence {self.name!r} is not one of {', '.join(DIVERGENCES)}")
    if not 0.0 < self.jsd_beta < 1.0:
      raise ValueError(f"jsd_beta={self.jsd_beta!r} must be in (0, 1)")
    if not 0.0 <= self.skew_alpha < 1.0:
      raise ValueError(f"skew_alpha={self.skew_alpha!r} must be in [0, 1)")
    if not 0.0 <= self.akl_mu <= 1.0:
      raise ValueError(f"akl_mu={self.akl_mu!r} must be in [0, 1]")


def as_divergence(divergence: str | Divergence) -> Divergence:
  return divergence if isinstance(divergence, Divergence) else Divergence(str(divergence))


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


def log_mixture(a: float, log_x: jax.Array, log_y: jax.Array) -> jax.Array:
  """``log(a x + (1 - a) y)`` from log-probabilities, for a static ``a`` in [0, 1)."""
  if a == 0.0:
    return log_y
  return jnp.logaddexp(jnp.log(a) + log_x, jnp.log1p(-a) + log_y)


def akl_weights(p: jax.Array, q: jax.Array, mu: float) -> tuple[jax.Array, jax.Array]:
  """Adaptive-KL weights ``(w_head, w_tail)`` over the last axis; no gradient flows.

  Sort the teacher's probabilities ``p`` in decreasing order (ties by vocabulary id);
  the head is the leading tokens whose cumulative teacher probability, including
  their own, is at most ``mu``, plus always the most likely token; the tail is the
  rest. With the gaps ``g_head = sum_head |p - q|`` and ``g_tail = sum_tail |p - q|``:
  ``w_head = g_head / (g_head + g_tail)``, ``w_tail = g_tail / (g_head + g_tail)``
  (both 0 where ``p == q`` exactly, where both KLs are 0 too).
  """
  p, q = jax.lax.stop_gradient(p), jax.lax.stop_gradient(q)
  axis = p.ndim - 1
  # One stable sort with the gaps as payload: no gather (partitions over a sharded V).
  neg_sorted, gap_sorted = jax.lax.sort((-p, jnp.abs(p - q)), dimension=axis, num_keys=1, is_stable=True)
  rank = jax.lax.broadcasted_iota(jnp.int32, p.shape, axis)
  head = (jnp.cumsum(-neg_sorted, axis=axis) <= mu) | (rank == 0)
  g_head = jnp.sum(jnp.where(head, gap_sorted, 0.0), axis=axis)
  g_tail = jnp.sum(jnp.where(head, 0.0, gap_sorted), axis=axis)
  total = jnp.maximum(g_head + g_tail, jnp.finfo(p.dtype).tiny)
  return g_head / total, g_tail / total


def divergence_from_log_probs(divergence: str | Divergence, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """``D(P || Q)`` over the last axis from the teacher's and student's log-probabilities.

  Plain formulas (autodiff differentiates them); no ``T^2`` factor.
  """
  div = as_divergence(divergence)
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  kl = lambda x, log_x, log_y: jnp.sum(x * (log_x - log_y), axis=-1)
  if div.name == "forward_kl":
    return kl(p, log_p, log_q)
  if div.name == "reverse_kl":
    return kl(q, log_q, log_p)
  if div.name == "jsd":
    b = div.jsd_beta
    log_m = log_mixture(b, log_p, log_q)
    return b * kl(p, log_p, log_m) + (1.0 - b) * kl(q, log_q, log_m)
  if div.name == "tvd":
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
  if div.name == "skew_forward_kl":
    return kl(p, log_p, log_mixture(div.skew_alpha, log_p, log_q))
  if div.name == "skew_reverse_kl":
    return kl(q, log_q, log_mixture(div.skew_alpha, log_q, log_p))
  w_head, w_tail = akl_weights(p, q, div.akl_mu)  # "akl"
  return w_head * kl(p, log_p, log_q) + w_tail * kl(q, log_q, log_p)


def static_or_traced(x):
  """A Python float for a concrete number; a ``jax.Array`` (e.g. a tracer of a schedule) as is."""
  return x if isinstance(x, jax.Array) else float(x)


def kd_token_losses_from_logits(student_logits: jax.Array, teacher_logits: jax.Array | None,
    targets: jax.Array, mask: jax.Array, *, temperature: float | jax.Array,
    divergence: str | Divergence = "forward_kl", valid_vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-token CE and ``T^2``-scaled divergence from logits.

  Args:
    student_logits: ``[B, S, V]`` (any float dtype; computed in float32).
    teacher_logits: ``[B, S, Vt]`` or ``None`` (then ``kl_tok`` is zeros), ``Vt >= valid_vocab``.
    It is wrapped in ``stop_gradient``: the teacher is frozen.
    targets: ``[B, S]`` int next-token ids (any value where ``mask == 0``).
    mask: ``[B, S]``; a token counts iff ``mask != 0``.
    temperature: distillation temperature ``T > 0``: a Python number or a traced scalar
    (a schedule evaluated inside a jitted step).
    divergence: a name of ``DIVERGENCES`` or a ``Divergence``.
    valid_vocab: only the first ``valid_vocab`` logits of both models count (``None``:
    the student's ``V``); the padded ones get no probability mass.

  Returns:
    ``(ce_tok, kl_tok)``, float32 ``[B, S]``, zero where ``mask == 0``.
  """
  div = as_divergence(divergence)
  valid = mask != 0
  vocab = student_logits.shape[-1]
  if valid_vocab is not None and valid_vocab != vocab:
    if not 0 < valid_vocab <= vocab:
      raise ValueError(f"valid_vocab={valid_vocab} must be in [1, student vocab {vocab}]")
    student_logits = student_logits[..., :valid_vocab]
    vocab = valid_vocab
  z_s = student_logits.astype(loss_dtype(student_logits))
  ce = jax.nn.logsumexp(z_s, axis=-1) - _target_logit(z_s, targets)
  ce_tok = jnp.where(valid, ce, 0.0)
  if teacher_logits is None:
    return ce_tok, jnp.zeros_like(ce_tok)
  if teacher_logits.shape[-1] < vocab:
    raise ValueError(f"teacher vocab {teacher_logits.shape[-1]} < {vocab}: the teacher must cover the student's "
                     "(valid) vocabulary")
  if teacher_logits.shape[-1] != vocab:
    teacher_logits = teacher_logits[..., :vocab]
  t = static_or_traced(temperature)
  z_t = jax.lax.stop_gradient(teacher_logits).astype(z_s.dtype)
  log_p = jax.nn.log_softmax(z_t / t, axis=-1)  # teacher, at temperature T
  log_q = jax.nn.log_softmax(z_s / t, axis=-1)  # student, at temperature T
  if div.name == "forward_kl":
    kl = (t * t) * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  else:
    kl = (t * t) * divergence_from_log_probs(div, log_p, log_q)
  kl_tok = jnp.where(valid, kl, 0.0)
  return ce_tok, kl_tok


def kd_token_losses(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array | None,
    teacher_head: jax.Array | None, targets: jax.Array, mask: jax.Array, *, temperature: float | jax.Array,
    divergence: str | Divergence = "forward_kl", valid_vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Naive CE + KD token losses from final hidden states and head weights.

  Args:
    student_hidden: ``[B, S, H]`` final (normed) hidden states, any float dtype.
    student_head: ``[H, V]`` output projection.
    teacher_hidden: ``[B, S, Ht]`` or ``None``.
    teacher_head: ``[Ht, Vt]`` or ``None`` (both ``None`` or neither); ``Vt`` may differ
    from ``V`` (padded embeddings) as long as it covers ``valid_vocab``.
    targets, mask, temperature, divergence, valid_vocab: as in
    ``kd_token_losses_from_logits``.

  Returns:
    ``(ce_tok, kl_tok)``, float32 ``[B, S]``, zero where ``mask == 0``. The
    caller forms ``(sum(ce_tok) + gamma * sum(kl_tok)) / count``.
  """
  if (teacher_hidden is None) != (teacher_head is None):
    raise ValueError("teacher_hidden and teacher_head must both be given or both be None")
  vocab = student_head.shape[1]
  if valid_vocab is not None and valid_vocab != vocab:
    if not 0 < valid_vocab <= vocab:
      raise ValueError(f"valid_vocab={valid_vocab} must be in [1, student vocab {vocab}]")
    student_head = student_head[:, :valid_vocab]  # padded rows: no logits, zero gradient
    vocab = valid_vocab
  z_s = logits_f32(student_hidden, student_head)
  z_t = None
  if teacher_hidden is not None:
    if teacher_head.shape[1] < vocab:
      raise ValueError(f"teacher vocab {teacher_head.shape[1]} < {vocab}: the teacher must cover the student's "
                       "(valid) vocabulary")
    if teacher_head.shape[1] != vocab:
      teacher_head = teacher_head[:, :vocab]
    z_t = logits_f32(
      jax.lax.stop_gradient(teacher_hidden), jax.lax.stop_gradient(teacher_head)
    )
  return kd_token_losses_from_logits(z_s, z_t, targets, mask, temperature=temperature, divergence=divergence)


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


# ---- a teacher from a top-k cache (ddk_jax.teacher_cache) ------------------------------------------------

# Divergences that depend on the teacher only through the k+1 buckets a cache keeps (the f-divergences:
# sums over the vocabulary of a function of q_v and p_v / q_v). AKL's head/tail split sorts the teacher's
# whole distribution, which a top-k cache does not hold.
CACHE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")

_MASKED = -1e30  # a log-probability of exactly zero mass that keeps differences finite


class CachedTeacher(NamedTuple):
  """The teacher's distribution per token as a cache stores it, at temperature 1.

  ``ids`` ``[B, S, k]`` int (any integer dtype): the teacher's top-k token ids; ``logp``
  ``[B, S, k]`` (any float dtype): their log-probabilities; ``tail`` ``[B, S]``: the log of
  the probability of every other id (``-inf`` or very negative when the top-k hold it all).
  """

  ids: jax.Array
  logp: jax.Array
  tail: jax.Array


def check_cache_divergence(divergence: str | Divergence) -> Divergence:
  div = as_divergence(divergence)
  if div.name not in CACHE_DIVERGENCES:
    raise ValueError(f"divergence {div.name!r} cannot be computed from a top-k teacher cache (it needs the "
                     f"teacher's whole distribution); use one of {', '.join(CACHE_DIVERGENCES)}")
  return div


def cached_bucket_log_probs(logp: jax.Array, tail: jax.Array, temperature) -> jax.Array:
  """The teacher's k+1 bucket log-probabilities at temperature ``T``: ``[..., k+1]``, float32.

  The cached log-probabilities (temperature 1) of the top-k ids and of the tail bucket are
  divided by ``T`` and renormalised over the k+1 buckets. At ``T = 1`` this is the cached
  distribution itself; at ``T != 1`` the tail is tempered as one bucket (``P_tail^(1/T)``, not
  the sum of its ids' ``p^(1/T)``). Zero mass stays at a very negative finite value.
  """
  t = static_or_traced(temperature)
  a = jnp.concatenate([logp.astype(jnp.float32), tail.astype(jnp.float32)[..., None]], axis=-1)
  a = jnp.maximum(a / t, _MASKED)
  return jnp.maximum(a - jax.nn.logsumexp(a, axis=-1, keepdims=True), _MASKED)


def _scatter_ids(shape, ids: jax.Array, values) -> jax.Array:
  """``[B, c, V]`` zeros (False) with ``values`` put at each token's ``ids`` ``[B, c, k]``."""
  b, c, _ = ids.shape
  bi = jnp.arange(b)[:, None, None]
  ci = jnp.arange(c)[None, :, None]
  dtype = jnp.bool_ if values is True else values.dtype
  return jnp.zeros(shape, dtype).at[bi, ci, ids].set(values)


def kd_token_losses_cached(student_hidden: jax.Array, student_head: jax.Array, cached: CachedTeacher,
    targets: jax.Array, mask: jax.Array, *, temperature: float | jax.Array,
    divergence: str | Divergence = "forward_kl", valid_vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Naive CE + KD token losses against a cached top-k teacher (the reference of the chunked form).

  Both distributions are reduced to the same k+1 buckets: the teacher's are its cached top-k
  log-probabilities and tail (``cached_bucket_log_probs``), the student's its tempered
  log-probabilities at the teacher's k ids and the log of its remaining mass. ``kl_tok`` is
  ``T^2 D(P_buckets || Q_buckets)``, differentiated by autodiff; ``ce_tok`` is the plain CE.
  Other arguments as in ``kd_token_losses``.
  """
  div = check_cache_divergence(divergence)
  vocab = student_head.shape[1]
  if valid_vocab is not None and valid_vocab != vocab:
    if not 0 < valid_vocab <= vocab:
      raise ValueError(f"valid_vocab={valid_vocab} must be in [1, student vocab {vocab}]")
    student_head = student_head[:, :valid_vocab]
  z_s = logits_f32(student_hidden, student_head)
  valid = mask != 0
  ce = jax.nn.logsumexp(z_s, axis=-1) - _target_logit(z_s, targets)
  t = static_or_traced(temperature)
  log_q = jax.nn.log_softmax(z_s / t, axis=-1)
  ids = cached.ids.astype(jnp.int32)
  in_k = _scatter_ids(z_s.reshape((-1,) + z_s.shape[-2:]).shape, ids.reshape((-1,) + ids.shape[-2:]), True)
  in_k = in_k.reshape(z_s.shape)
  log_q_tail = jax.nn.logsumexp(jnp.where(in_k, _MASKED, log_q), axis=-1)
  log_q_b = jnp.concatenate([jnp.take_along_axis(log_q, ids, axis=-1), log_q_tail[..., None]], axis=-1)
  log_q_b = jnp.maximum(log_q_b, _MASKED)
  log_p_b = jax.lax.stop_gradient(cached_bucket_log_probs(cached.logp, cached.tail, t))
  kl = (t * t) * divergence_from_log_probs(div, log_p_b, log_q_b)
  return jnp.where(valid, ce, 0.0), jnp.where(valid, kl, 0.0)
