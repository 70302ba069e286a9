"""Memory-lean CE + KD loss over token chunks (custom VJP).

Same numbers as ``ddk_jax.losses.kd_token_losses`` (see its docstring and
docs/loss.md for the convention), computed from hidden states and head weights
one chunk of tokens at a time, so no ``[tokens, V]`` fp32 buffer of either model
is ever alive; the largest temporaries are a few ``[chunk, V]`` fp32 blocks and
the fp32 head-gradient accumulator ``[H, V]``.

Two entry points:

* ``chunked_kd_token_losses`` -> ``(ce_tok, kl_tok)``: drop-in for the naive
  loss. Per-token outputs may receive arbitrary cotangents, so the forward saves
  only three per-token log-sum-exps and the backward recomputes both models'
  logits chunk by chunk (6 large matmuls in all instead of the naive 4).
* ``chunked_kd_loss_sum`` -> ``(sum(ce) + gamma * sum(kl), (ce_tok, kl_tok))``:
  the training form. Its only differentiable output is a scalar, so the
  gradient for a unit cotangent is computed in the same pass as the values and
  just scaled in the backward: no recomputation, 4 large matmuls like the naive
  loss. The per-token outputs are ``stop_gradient``-ed (metrics only).

Layout: tokens are chunked along the sequence axis, keeping the batch axis whole
(a chunk is ``[B, c]`` tokens with ``c = chunk_size // B``). The batch axis is the
one sharded across data-parallel devices, so under GSPMD every device works on
its slice of every chunk and the scan needs no communication beyond what the
head's own sharding implies. Everything is plain ``jnp``/``lax``.

Precision: logits, softmaxes and the head-gradient accumulator are fp32. With
bf16 hidden states/heads, the matmuls run in bf16 with fp32 accumulation, the
logit gradient is rounded to bf16 before the two gradient matmuls, and the
gradients are returned in the input dtypes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ddk_jax.losses import CachedTeacher, Divergence, akl_weights, as_divergence, cached_bucket_log_probs
from ddk_jax.losses import check_cache_divergence, log_mixture, logits_f32, loss_dtype, static_or_traced

__all__ = [
  "default_chunk_size",
  "chunked_kd_token_losses",
  "chunked_kd_loss_sum",
  "chunked_kd_loss_sum_cached",
]

# Target size of one fp32 [chunk, V] block. A handful of these are live per
# chunk (student/teacher logits, probabilities, logit gradient), so this bounds
# the loss's temporaries at a few hundred MiB while keeping the head matmuls
# large enough to run near peak (reading W once per chunk must stay cheap
# relative to the chunk's FLOPs).
_CHUNK_BLOCK_BYTES = 128 * 2**20
_MIN_CHUNK = 256
_MAX_CHUNK = 8192


def default_chunk_size(vocab_size: int) -> int:
  """Tokens per chunk for a vocabulary: a power of two with chunk * V * 4 <= 128 MiB.

  32k vocab -> 1024 tokens, 152k -> 256 (never below 256, never above 8192).
  """
  tokens = max(1, _CHUNK_BLOCK_BYTES // (4 * int(vocab_size)))
  p = 1 << (tokens.bit_length() - 1)  # round down to a power of two
  return int(min(max(p, _MIN_CHUNK), _MAX_CHUNK))


# ----------------------------------------------------------------------------
# layout helpers: [B, S, ...] <-> [n, B, c, ...]


def _layout(batch: int, seq: int, chunk_size: int) -> tuple[int, int]:
  """Positions per chunk ``c`` and number of chunks ``n`` (``n * c >= seq``)."""
  c = max(1, min(seq, int(chunk_size) // max(1, batch)))
  n = -(-seq // c)
  return c, n


def _to_chunks(x: jax.Array, c: int, n: int, fill=0) -> jax.Array:
  b, s = x.shape[:2]
  pad = n * c - s
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape((b, n, c) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_chunks(x: jax.Array, seq: int) -> jax.Array:
  x = jnp.moveaxis(x, 0, 1)
  b, n, c = x.shape[:3]
  return x.reshape((b, n * c) + x.shape[3:])[:, :seq]


# ----------------------------------------------------------------------------
# static description of one loss call (hashable: a nondiff argument of the custom VJPs)

# Tempered logit given to vocabulary rows beyond `valid_vocab`: exp() of it minus any
# log-sum-exp is exactly 0, and differences of two such log-probabilities are finite.
_MASKED_LOGIT = -1e30


@dataclasses.dataclass(frozen=True)
class _Static:
  divergence: Divergence
  valid_vocab: int | None  # None: every column of the student head counts
  temperature: float | None  # None: traced, in dyn["temperature"]
  gamma: float | None  # None: traced, in dyn["gamma"] (loss-sum form only)
  chunk_size: int | None
  teacher_ce: bool = False  # loss-sum form: also the teacher's CE at the target, per token


def _hyper(st: _Static, dyn: dict, key: str):
  value = getattr(st, key)
  return dyn[key] if value is None else value


def _is_one(t) -> bool:
  return not isinstance(t, jax.Array) and t == 1.0


# ----------------------------------------------------------------------------
# per-chunk math (all fp32 on [B, c, V] blocks)


def _lse(z: jax.Array) -> jax.Array:
  m = jnp.max(z, axis=-1, keepdims=True)
  return jnp.log(jnp.sum(jnp.exp(z - m), axis=-1)) + m[..., 0]


def _is_target(shape, targets: jax.Array) -> jax.Array:
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
  return vocab_ids == targets[..., None].astype(jnp.int32)


def _mask_vocab(z: jax.Array, st: _Static) -> jax.Array:
  if st.valid_vocab is None:
    return z
  cols = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
  return jnp.where(cols < st.valid_vocab, z, _MASKED_LOGIT)


def _tempered(z: jax.Array, t, st: _Static) -> jax.Array:
  # Masked after dividing, so a tiny T cannot overflow the masked rows to -inf.
  return _mask_vocab(z / t, st)


def _divergence_and_grad(div: Divergence, log_p: jax.Array, log_q: jax.Array, need_grad: bool):
  """Per-token ``D(P || Q)`` and, if asked, ``dD/ds`` [B, c, V] with ``s = z_S / T``.

  For a function of ``q = softmax(s)``: ``dD/ds = q * (g - sum(q * g))``, ``g = dD/dq``.
  Each branch is that identity worked out (``r = <q, x>`` below is a per-token scalar).
  """
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  ksum = lambda x: jnp.sum(x, axis=-1)
  dot_q = lambda x: ksum(q * x)[..., None]
  name = div.name
  if name == "reverse_kl":  # D = KL(Q||P); dD/ds = q (log q - log p - D)
    d = ksum(q * (log_q - log_p))
    return d, (q * (log_q - log_p - d[..., None]) if need_grad else None)
  if name == "jsd":  # D = b KL(P||M) + (1-b) KL(Q||M); dD/ds = (1-b) q (log(q/m) - KL(Q||M))
    b = div.jsd_beta
    log_m = log_mixture(b, log_p, log_q)
    kl_qm = ksum(q * (log_q - log_m))
    d = b * ksum(p * (log_p - log_m)) + (1.0 - b) * kl_qm
    return d, ((1.0 - b) * q * (log_q - log_m - kl_qm[..., None]) if need_grad else None)
  if name == "tvd":  # D = 0.5 sum |p - q|; dD/ds = 0.5 q (sign(q - p) - <q, sign(q - p)>)
    d = 0.5 * ksum(jnp.abs(p - q))
    if not need_grad:
      return d, None
    sign = jnp.sign(q - p)
    return d, 0.5 * q * (sign - dot_q(sign))
  if name == "skew_forward_kl":  # D = KL(P||M), M = aP + (1-a)Q; dD/ds = -(1-a) q (p/m - <q, p/m>)
    a = div.skew_alpha
    log_m = log_mixture(a, log_p, log_q)
    d = ksum(p * (log_p - log_m))
    if not need_grad:
      return d, None
    ratio = jnp.exp(log_p - log_m)
    return d, -(1.0 - a) * q * (ratio - dot_q(ratio))
  if name == "skew_reverse_kl":  # D = KL(Q||M'), M' = aQ + (1-a)P; dD/ds = q (log(q/m') - D - a (r - <q, r>)), r = q/m'
    a = div.skew_alpha
    log_m = log_mixture(a, log_q, log_p)
    d = ksum(q * (log_q - log_m))
    if not need_grad:
      return d, None
    ratio = jnp.exp(log_q - log_m)
    return d, q * (log_q - log_m - d[..., None] - a * (ratio - dot_q(ratio)))
  if name == "akl":  # D = w_h KL(P||Q) + w_t KL(Q||P), weights constant
    w_head, w_tail = akl_weights(p, q, div.akl_mu)
    rkl = ksum(q * (log_q - log_p))
    d = w_head * ksum(p * (log_p - log_q)) + w_tail * rkl
    if not need_grad:
      return d, None
    return d, w_head[..., None] * (q - p) + w_tail[..., None] * q * (log_q - log_p - rkl[..., None])
  raise ValueError(f"no chunked form for divergence {name!r}")


def _chunk_values(z_s, z_t, tgt, t, st):
  """Per-token (ce, kd, lse_s, lse_s/T, lse_t/T) of one chunk, unmasked. z_s is vocab-masked."""
  lse_s = _lse(z_s)
  ce = lse_s - jnp.sum(jnp.where(_is_target(z_s.shape, tgt), z_s, 0.0), axis=-1)
  if z_t is None:
    zero = jnp.zeros_like(ce)
    return ce, zero, lse_s, zero, zero
  # At T == 1 the tempered student lse is lse_s: skip one exp pass over [c, V].
  lse_s_t = lse_s if _is_one(t) else _lse(_tempered(z_s, t, st))
  lse_t_t = _lse(_tempered(z_t, t, st))
  log_p = _tempered(z_t, t, st) - lse_t_t[..., None]
  log_q = _tempered(z_s, t, st) - lse_s_t[..., None]
  if st.divergence.name == "forward_kl":
    kl = (t * t) * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  else:
    kl = (t * t) * _divergence_and_grad(st.divergence, log_p, log_q, need_grad=False)[0]
  return ce, kl, lse_s, lse_s_t, lse_t_t


def _teacher_chunk_ce(z_t, tgt, t, lse_t_t, st):
  """The teacher's own CE at the target (untempered, vocab-masked) for one chunk, from the
  chunk's teacher logits: at T == 1 it reuses the tempered lse, else one more lse over them."""
  z = _mask_vocab(z_t, st)
  lse = lse_t_t if _is_one(t) else _lse(z)
  return lse - jnp.sum(jnp.where(_is_target(z.shape, tgt), z, 0.0), axis=-1)


def _chunk_dlogits(z_s, z_t, tgt, valid, lse_s, lse_s_t, lse_t_t, g_ce, g_kl, t, st):
  """d(sum g_ce*ce + g_kl*kd)/d z_s for one chunk: fp32 [B, c, V].

  d ce / d z_s = softmax(z_s) - onehot(target)
  d kd / d z_s = T * dD/ds   (the T^2 of kd times the 1/T of s = z_s/T);
                 forward KL: dD/ds = softmax(z_s/T) - softmax(z_t/T)
  """
  d = g_ce[..., None] * (jnp.exp(z_s - lse_s[..., None]) - _is_target(z_s.shape, tgt))
  if z_t is not None:
    if st.divergence.name == "forward_kl":
      q = jnp.exp(_tempered(z_s, t, st) - lse_s_t[..., None])
      p = jnp.exp(_tempered(z_t, t, st) - lse_t_t[..., None])
      d = d + (t * g_kl)[..., None] * (q - p)
    else:
      log_p = _tempered(z_t, t, st) - lse_t_t[..., None]
      log_q = _tempered(z_s, t, st) - lse_s_t[..., None]
      _, grad = _divergence_and_grad(st.divergence, log_p, log_q, need_grad=True)
      d = d + (t * g_kl)[..., None] * grad
  # Padding rows contribute nothing, even if their hidden states are not finite; padded
  # vocabulary rows get exactly zero.
  keep = valid[..., None]
  if st.valid_vocab is not None:
    keep = keep & (jax.lax.broadcasted_iota(jnp.int32, d.shape, d.ndim - 1) < st.valid_vocab)
  return jnp.where(keep, d, 0.0)


def _grad_matmuls(hs_c, ws, dz, cdt):
  """(d hidden [B, c, H], d head [H, V]), both in dz's fp32, for one chunk's logit grads."""
  acc = dz.dtype
  dz = dz.astype(cdt)
  dh = jax.lax.dot_general(
    dz, ws.astype(cdt), (((2,), (1,)), ((), ())), preferred_element_type=acc
  )
  dw = jax.lax.dot_general(
    hs_c.astype(cdt), dz, (((0, 1), (0, 1)), ((), ())), preferred_element_type=acc
  )
  return dh, dw


# ----------------------------------------------------------------------------
# scans over chunks


def _prepare(hs, ht, targets, mask, chunk_size, vocab):
  if hs.ndim != 3:
    raise ValueError(f"student_hidden must be [B, S, H], got shape {hs.shape}")
  b, s, _ = hs.shape
  if chunk_size is None:
    chunk_size = default_chunk_size(vocab)
  c, n = _layout(b, s, chunk_size)
  xs = {
    "hs": _to_chunks(hs, c, n),
    "tgt": _to_chunks(targets, c, n),
    "valid": _to_chunks(mask != 0, c, n, fill=False),
  }
  if ht is not None:
    xs["ht"] = _to_chunks(ht, c, n)
  return xs, c, n


def _logits(xs, ws, wt, st):
  z_s = _mask_vocab(logits_f32(xs["hs"], ws), st)
  z_t = logits_f32(xs["ht"], wt) if "ht" in xs else None
  return z_s, z_t


def _values_scan(hs, ws, ht, wt, targets, mask, t, st):
  """Forward only: per-token ce, kd (masked) and the three lse's, each [B, S]; with
  `st.teacher_ce` the teacher's CE (masked) last."""
  xs, _, _ = _prepare(hs, ht, targets, mask, st.chunk_size, ws.shape[1])

  def body(_, x):
    z_s, z_t = _logits(x, ws, wt, st)
    ce, kl, *lses = _chunk_values(z_s, z_t, x["tgt"], t, st)
    ce = jnp.where(x["valid"], ce, 0.0)
    kl = jnp.where(x["valid"], kl, 0.0)
    if st.teacher_ce:
      return None, (ce, kl, *lses, jnp.where(x["valid"], _teacher_chunk_ce(z_t, x["tgt"], t, lses[2], st), 0.0))
    return None, (ce, kl, *lses)

  _, ys = jax.lax.scan(body, None, xs)
  s = hs.shape[1]
  return tuple(_from_chunks(y, s) for y in ys)


def _grads_scan(hs, ws, ht, wt, targets, mask, t, st, g_ce, g_kl, lses):
  """Backward of the token losses: recompute logits per chunk; (d hs fp32, d ws fp32)."""
  xs, c, n = _prepare(hs, ht, targets, mask, st.chunk_size, ws.shape[1])
  xs["g_ce"] = _to_chunks(g_ce.astype(lses[0].dtype), c, n)
  xs["g_kl"] = _to_chunks(g_kl.astype(lses[0].dtype), c, n)
  xs["lses"] = tuple(_to_chunks(v, c, n) for v in lses)
  cdt = jnp.promote_types(hs.dtype, ws.dtype)

  def body(dw_acc, x):
    z_s, z_t = _logits(x, ws, wt, st)
    dz = _chunk_dlogits(
      z_s, z_t, x["tgt"], x["valid"], *x["lses"], x["g_ce"], x["g_kl"], t, st
    )
    dh, dw = _grad_matmuls(x["hs"], ws, dz, cdt)
    return dw_acc + dw, dh

  dw, dh = jax.lax.scan(body, jnp.zeros(ws.shape, loss_dtype(hs, ws)), xs)
  return _from_chunks(dh, hs.shape[1]), dw


def _fused_scan(hs, ws, ht, wt, targets, mask, t, gamma, st):
  """Values and the gradient of sum(ce) + gamma*sum(kd) in one pass over chunks; with
  `st.teacher_ce` the teacher's per-token CE too (returned last)."""
  xs, _, _ = _prepare(hs, ht, targets, mask, st.chunk_size, ws.shape[1])
  cdt = jnp.promote_types(hs.dtype, ws.dtype)

  def body(dw_acc, x):
    z_s, z_t = _logits(x, ws, wt, st)
    ce, kl, *lses = _chunk_values(z_s, z_t, x["tgt"], t, st)
    ones = jnp.ones_like(ce)
    dz = _chunk_dlogits(
      z_s, z_t, x["tgt"], x["valid"], *lses, ones, gamma * ones, t, st
    )
    dh, dw = _grad_matmuls(x["hs"], ws, dz, cdt)
    ce = jnp.where(x["valid"], ce, 0.0)
    kl = jnp.where(x["valid"], kl, 0.0)
    if st.teacher_ce:
      return dw_acc + dw, (ce, kl, dh, jnp.where(x["valid"], _teacher_chunk_ce(z_t, x["tgt"], t, lses[2], st), 0.0))
    return dw_acc + dw, (ce, kl, dh)

  dw, ys = jax.lax.scan(body, jnp.zeros(ws.shape, loss_dtype(hs, ws)), xs)
  s = hs.shape[1]
  out = (_from_chunks(ys[0], s), _from_chunks(ys[1], s), _from_chunks(ys[2], s), dw)
  return out + (_from_chunks(ys[3], s),) if st.teacher_ce else out


def _teacher_zeros(ht, wt):
  if ht is None:
    return None, None
  return jnp.zeros_like(ht), jnp.zeros_like(wt)


def _dyn_zeros(dyn: dict) -> dict:
  return {k: jnp.zeros_like(v) for k, v in dyn.items()}


# ----------------------------------------------------------------------------
# token losses: arbitrary per-token cotangents


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _token_losses(hs, ws, ht, wt, targets, mask, dyn, st):
  t = _hyper(st, dyn, "temperature")
  ce, kl, *_ = _values_scan(hs, ws, ht, wt, targets, mask, t, st)
  return ce, kl


def _token_losses_fwd(hs, ws, ht, wt, targets, mask, dyn, st):
  t = _hyper(st, dyn, "temperature")
  ce, kl, *lses = _values_scan(hs, ws, ht, wt, targets, mask, t, st)
  # Saved: the inputs (already alive) and three fp32 [B, S] log-sum-exps.
  return (ce, kl), (hs, ws, ht, wt, targets, mask, dyn, tuple(lses))


def _token_losses_bwd(st, res, cts):
  hs, ws, ht, wt, targets, mask, dyn, lses = res
  g_ce, g_kl = cts
  t = _hyper(st, dyn, "temperature")
  dh, dw = _grads_scan(hs, ws, ht, wt, targets, mask, t, st, g_ce, g_kl, lses)
  dht, dwt = _teacher_zeros(ht, wt)
  return dh.astype(hs.dtype), dw.astype(ws.dtype), dht, dwt, None, None, _dyn_zeros(dyn)


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def _check_teacher(teacher_hidden, teacher_head, student_head, valid_vocab):
  """The frozen teacher's inputs, its head brought to the student head's width."""
  if (teacher_hidden is None) != (teacher_head is None):
    raise ValueError("teacher_hidden and teacher_head must both be given or both be None")
  if teacher_hidden is None:
    return None, None
  vt, vs = teacher_head.shape[1], student_head.shape[1]
  need = vs if valid_vocab is None else valid_vocab
  if vt < need:
    raise ValueError(
      f"teacher vocab {vt} < {need}: the teacher must cover the student's vocabulary"
      f"{'' if valid_vocab is None else ' (valid_vocab)'}; slice the teacher head to the shared vocabulary first")
  wt = jax.lax.stop_gradient(teacher_head)
  if vt > vs:  # rows past the student's head: never a target, never in the loss
    wt = wt[:, :vs]
  elif vt < vs:  # the student is padded further: those columns are masked (valid_vocab <= vt)
    wt = jnp.pad(wt, ((0, 0), (0, vs - vt)))
  return jax.lax.stop_gradient(teacher_hidden), wt


def _static_and_dyn(student_head, divergence, valid_vocab, temperature, gamma, chunk_size, teacher_ce=False):
  vocab = student_head.shape[1]
  if valid_vocab is not None:
    valid_vocab = int(valid_vocab)
    if not 0 < valid_vocab <= vocab:
      raise ValueError(f"valid_vocab={valid_vocab} must be in [1, student vocab {vocab}]")
    if valid_vocab == vocab:
      valid_vocab = None
  dyn = {}
  t = static_or_traced(temperature)
  if isinstance(t, jax.Array):
    dyn["temperature"], t = t, None
  g = None if gamma is None else static_or_traced(gamma)
  if isinstance(g, jax.Array):
    dyn["gamma"], g = g, None
  st = _Static(divergence=as_divergence(divergence), valid_vocab=valid_vocab, temperature=t, gamma=g,
               chunk_size=chunk_size, teacher_ce=teacher_ce)
  return st, dyn


def chunked_kd_token_losses(student_hidden: jax.Array, student_head: jax.Array,
    teacher_hidden: jax.Array | None, teacher_head: jax.Array | None, targets: jax.Array, mask: jax.Array, *,
    temperature: float | jax.Array, chunk_size: int | None = None, divergence: str | Divergence = "forward_kl",
    valid_vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Chunked ``(ce_tok, kl_tok)``; same contract as ``losses.kd_token_losses``.

  Args:
    student_hidden: ``[B, S, H]`` (fp32 or bf16); student_head ``[H, V]``.
    teacher_hidden: ``[B, S, Ht]`` and teacher_head ``[Ht, Vt]``, or both ``None``
    (then ``kl_tok`` is zeros). No gradient reaches the teacher (zeros). ``Vt`` may
    differ from ``V`` if it covers ``valid_vocab``.
    targets: ``[B, S]`` int; mask: ``[B, S]``, a token counts iff ``mask != 0``.
    temperature: ``T``: a Python number (static) or a traced scalar (a schedule).
    chunk_size: target tokens per chunk (static); ``None`` picks
    ``default_chunk_size(V)``. The sequence is cut into pieces of
    ``max(1, chunk_size // B)`` positions.
    divergence: a name of ``losses.DIVERGENCES`` or a ``losses.Divergence``.
    valid_vocab: the first ``valid_vocab`` vocabulary rows count, the rest are masked
    (``None``: all ``V``).

  Returns:
    ``(ce_tok, kl_tok)`` float32 ``[B, S]``, zero where ``mask == 0``. Gradients
    w.r.t. student hidden/head come back in their input dtypes.
  """
  st, dyn = _static_and_dyn(student_head, divergence, valid_vocab, temperature, None, chunk_size)
  ht, wt = _check_teacher(teacher_hidden, teacher_head, student_head, st.valid_vocab)
  return _token_losses(student_hidden, student_head, ht, wt, targets, mask, dyn, st)


# ----------------------------------------------------------------------------
# scalar training loss: gradient computed in the forward pass


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _loss_sum(hs, ws, ht, wt, targets, mask, dyn, st):
  t, gamma = _hyper(st, dyn, "temperature"), _hyper(st, dyn, "gamma")
  ce, kl, *rest = _values_scan(hs, ws, ht, wt, targets, mask, t, st)
  return (jnp.sum(ce) + gamma * jnp.sum(kl), ce, kl) + ((rest[-1],) if st.teacher_ce else ())


def _loss_sum_fwd(hs, ws, ht, wt, targets, mask, dyn, st):
  t, gamma = _hyper(st, dyn, "temperature"), _hyper(st, dyn, "gamma")
  ce, kl, dh, dw, *tce = _fused_scan(hs, ws, ht, wt, targets, mask, t, gamma, st)
  out = (jnp.sum(ce) + gamma * jnp.sum(kl), ce, kl) + tuple(tce)
  # Saved: gradients for a unit cotangent (d hidden fp32 [B,S,H], d head fp32
  # [H,V]); the per-token outputs are stop_gradient-ed by the wrapper.
  # Empty arrays carry the input dtypes (residuals must be arrays); the teacher
  # inputs are kept only for the shapes of their zero cotangents (XLA drops them).
  tags = (jnp.zeros((0,), hs.dtype), jnp.zeros((0,), ws.dtype))
  return out, (dh, dw, tags, ht, wt, dyn)


def _loss_sum_bwd(st, res, cts):
  dh, dw, (hs_tag, ws_tag), ht, wt, dyn = res
  g = cts[0]
  dht, dwt = _teacher_zeros(ht, wt)
  return ((g * dh).astype(hs_tag.dtype), (g * dw).astype(ws_tag.dtype), dht, dwt, None, None,
          _dyn_zeros(dyn))


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)


def chunked_kd_loss_sum(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array | None,
    teacher_head: jax.Array | None, targets: jax.Array, mask: jax.Array, *, temperature: float | jax.Array,
    gamma: float | jax.Array, chunk_size: int | None = None, divergence: str | Divergence = "forward_kl",
    valid_vocab: int | None = None, teacher_ce: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Training form: ``(sum(ce_tok) + gamma * sum(kl_tok), (ce_tok, kl_tok))``.

  Arguments as in ``chunked_kd_token_losses``, plus ``gamma`` (a Python number, or a
  traced scalar of a schedule). Divide the first output by the global token count to
  get the loss of the contract. Only that scalar is differentiable: under ``jax.grad``
  the forward pass already computes the gradient for a unit cotangent (no logits are
  recomputed in the backward), and ``ce_tok`` / ``kl_tok`` are ``stop_gradient``-ed
  (use them for metrics such as ``per_domain_sums``). Without differentiation (eval),
  only the values are computed.

  ``teacher_ce=True`` (a teacher is needed) adds a third per-token output, the teacher's own
  CE at the target, ``-log softmax(h_T @ W_T)[target]`` on the same vocabulary as the
  student's CE (untempered, like the eval step's): ``(total, (ce_tok, kl_tok, teacher_ce_tok))``.
  It is formed in the same pass over the chunks from the teacher logits already there (at
  T == 1 from their log-sum-exp too; otherwise with one more over the chunk).
  """
  if teacher_hidden is None and teacher_head is None:
    if teacher_ce:
      raise ValueError("teacher_ce=True needs the teacher's hidden states and head")
    gamma = 0.0
  st, dyn = _static_and_dyn(student_head, divergence, valid_vocab, temperature, gamma, chunk_size, teacher_ce)
  ht, wt = _check_teacher(teacher_hidden, teacher_head, student_head, st.valid_vocab)
  total, ce, kl, *tce = _loss_sum(student_hidden, student_head, ht, wt, targets, mask, dyn, st)
  return total, (jax.lax.stop_gradient(ce), jax.lax.stop_gradient(kl), *map(jax.lax.stop_gradient, tce))


# ----------------------------------------------------------------------------
# teacher from a top-k cache: the training form


def _cached_log_p(log_q, ids, logp, tail, t):
  """The teacher's tempered log-probabilities over the whole vocabulary, [B, c, V], from its k+1
  cached buckets: the top-k ids get their bucket's mass, and the tail bucket's mass is spread
  over the other ids in proportion to the student's ``q`` there.

  With this completion every f-divergence ``sum_v q_v f(p_v / q_v)`` over the vocabulary equals
  the one over the k+1 buckets (``p_v / q_v`` is constant on the tail), and so does its gradient
  with the completed teacher held constant (``dD/dq_v`` depends on ``v`` only through
  ``p_v / q_v``): the per-divergence code of the online teacher applies unchanged.
  """
  log_b = cached_bucket_log_probs(logp, tail, t)  # [B, c, k+1]
  log_pk, log_pt = log_b[..., :-1], log_b[..., -1]
  b, c, _ = ids.shape
  bi = jnp.arange(b)[:, None, None]
  ci = jnp.arange(c)[None, :, None]
  in_k = jnp.zeros(log_q.shape, jnp.bool_).at[bi, ci, ids].set(True)
  log_qt = _lse(jnp.where(in_k, _MASKED_LOGIT, log_q))
  spread = log_q + (log_pt - log_qt)[..., None]
  return jnp.maximum(spread.at[bi, ci, ids].set(log_pk), _MASKED_LOGIT)


def _chunk_cached(z_s, x, t, st, need_grad, gamma):
  """One chunk against the cached teacher: (ce, kd, d z_s for sum(ce) + gamma * sum(kd) or None)."""
  tgt = x["tgt"]
  lse_s = _lse(z_s)
  ce = lse_s - jnp.sum(jnp.where(_is_target(z_s.shape, tgt), z_s, 0.0), axis=-1)
  lse_s_t = lse_s if _is_one(t) else _lse(_tempered(z_s, t, st))
  log_q = _tempered(z_s, t, st) - lse_s_t[..., None]
  log_p = _cached_log_p(log_q, x["ids"], x["logp"], x["tail"], t)
  if st.divergence.name == "forward_kl":
    kl = (t * t) * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    grad = (jnp.exp(log_q) - jnp.exp(log_p)) if need_grad else None
  else:
    d, grad = _divergence_and_grad(st.divergence, log_p, log_q, need_grad=need_grad)
    kl = (t * t) * d
  if not need_grad:
    return ce, kl, None
  dz = jnp.exp(z_s - lse_s[..., None]) - _is_target(z_s.shape, tgt) + (t * gamma) * grad
  keep = x["valid"][..., None]
  if st.valid_vocab is not None:
    keep = keep & (jax.lax.broadcasted_iota(jnp.int32, dz.shape, dz.ndim - 1) < st.valid_vocab)
  return ce, kl, jnp.where(keep, dz, 0.0)


def _prepare_cached(hs, cached, targets, mask, chunk_size, vocab):
  xs, c, n = _prepare(hs, None, targets, mask, chunk_size, vocab)
  xs["ids"] = _to_chunks(cached.ids.astype(jnp.int32), c, n)
  xs["logp"] = _to_chunks(cached.logp, c, n)
  xs["tail"] = _to_chunks(cached.tail, c, n)
  return xs


def _cached_scan(hs, ws, cached, targets, mask, t, gamma, st, need_grad):
  xs = _prepare_cached(hs, cached, targets, mask, st.chunk_size, ws.shape[1])
  cdt = jnp.promote_types(hs.dtype, ws.dtype)

  def body(dw_acc, x):
    z_s = _mask_vocab(logits_f32(x["hs"], ws), st)
    ce, kl, dz = _chunk_cached(z_s, x, t, st, need_grad, gamma)
    ce = jnp.where(x["valid"], ce, 0.0)
    kl = jnp.where(x["valid"], kl, 0.0)
    if dz is None:
      return dw_acc, (ce, kl)
    dh, dw = _grad_matmuls(x["hs"], ws, dz, cdt)
    return dw_acc + dw, (ce, kl, dh)

  dw, ys = jax.lax.scan(body, jnp.zeros(ws.shape, loss_dtype(hs, ws)) if need_grad else None, xs)
  s = hs.shape[1]
  ys = tuple(_from_chunks(y, s) for y in ys)
  return (*ys, dw) if need_grad else ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _loss_sum_cached(hs, ws, cached, targets, mask, dyn, st):
  t, gamma = _hyper(st, dyn, "temperature"), _hyper(st, dyn, "gamma")
  ce, kl = _cached_scan(hs, ws, cached, targets, mask, t, gamma, st, need_grad=False)
  return jnp.sum(ce) + gamma * jnp.sum(kl), ce, kl


def _loss_sum_cached_fwd(hs, ws, cached, targets, mask, dyn, st):
  t, gamma = _hyper(st, dyn, "temperature"), _hyper(st, dyn, "gamma")
  ce, kl, dh, dw = _cached_scan(hs, ws, cached, targets, mask, t, gamma, st, need_grad=True)
  tags = (jnp.zeros((0,), hs.dtype), jnp.zeros((0,), ws.dtype))
  return (jnp.sum(ce) + gamma * jnp.sum(kl), ce, kl), (dh, dw, tags, dyn)


def _loss_sum_cached_bwd(st, res, cts):
  dh, dw, (hs_tag, ws_tag), dyn = res
  g = cts[0]
  return ((g * dh).astype(hs_tag.dtype), (g * dw).astype(ws_tag.dtype), None, None, None, _dyn_zeros(dyn))


_loss_sum_cached.defvjp(_loss_sum_cached_fwd, _loss_sum_cached_bwd)


def chunked_kd_loss_sum_cached(student_hidden: jax.Array, student_head: jax.Array, cached: CachedTeacher,
    targets: jax.Array, mask: jax.Array, *, temperature: float | jax.Array, gamma: float | jax.Array,
    chunk_size: int | None = None, divergence: str | Divergence = "forward_kl",
    valid_vocab: int | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """``chunked_kd_loss_sum`` against a teacher read from a top-k cache (``losses.CachedTeacher``).

  The KD term is ``T^2 D`` over the k+1 buckets of the cache (the teacher's top-k ids and the
  rest), the student reduced to the same buckets, as ``losses.kd_token_losses_cached`` computes
  it naively; no teacher forward or teacher head matmul. ``divergence`` must be one of
  ``losses.CACHE_DIVERGENCES``. Other arguments and the outputs as in ``chunked_kd_loss_sum``.
  """
  check_cache_divergence(divergence)
  st, dyn = _static_and_dyn(student_head, divergence, valid_vocab, temperature, gamma, chunk_size)
  total, ce, kl = _loss_sum_cached(student_hidden, student_head, CachedTeacher(*cached), targets, mask, dyn, st)
  return total, (jax.lax.stop_gradient(ce), jax.lax.stop_gradient(kl))
