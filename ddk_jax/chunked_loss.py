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

import functools

import jax
import jax.numpy as jnp

from ddk_jax.losses import logits_f32, loss_dtype

__all__ = [
  "default_chunk_size",
  "chunked_kd_token_losses",
  "chunked_kd_loss_sum",
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
# per-chunk math (all fp32 on [B, c, V] blocks)


def _lse(z: jax.Array) -> jax.Array:
  m = jnp.max(z, axis=-1, keepdims=True)
  return jnp.log(jnp.sum(jnp.exp(z - m), axis=-1)) + m[..., 0]


def _is_target(shape, targets: jax.Array) -> jax.Array:
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
  return vocab_ids == targets[..., None].astype(jnp.int32)


def _chunk_values(z_s, z_t, tgt, temperature):
  """Per-token (ce, kl, lse_s, lse_s/T, lse_t/T) of one chunk, unmasked."""
  t = temperature
  lse_s = _lse(z_s)
  ce = lse_s - jnp.sum(jnp.where(_is_target(z_s.shape, tgt), z_s, 0.0), axis=-1)
  if z_t is None:
    zero = jnp.zeros_like(ce)
    return ce, zero, lse_s, zero, zero
  # At T == 1 the tempered student lse is lse_s: skip one exp pass over [c, V].
  lse_s_t = lse_s if t == 1.0 else _lse(z_s / t)
  lse_t_t = _lse(z_t / t)
  log_p = z_t / t - lse_t_t[..., None]
  log_q = z_s / t - lse_s_t[..., None]
  kl = (t * t) * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return ce, kl, lse_s, lse_s_t, lse_t_t


def _chunk_dlogits(z_s, z_t, tgt, valid, lse_s, lse_s_t, lse_t_t, g_ce, g_kl, temperature):
  """d(sum g_ce*ce + g_kl*kl)/d z_s for one chunk: fp32 [B, c, V].

  d ce / d z_s = softmax(z_s) - onehot(target)
  d kl / d z_s = T * (softmax(z_s/T) - softmax(z_t/T))   (the T^2 of kl times 1/T)
  """
  t = temperature
  d = g_ce[..., None] * (jnp.exp(z_s - lse_s[..., None]) - _is_target(z_s.shape, tgt))
  if z_t is not None:
    q = jnp.exp(z_s / t - lse_s_t[..., None])
    p = jnp.exp(z_t / t - lse_t_t[..., None])
    d = d + (t * g_kl)[..., None] * (q - p)
  # Padding rows contribute nothing, even if their hidden states are not finite.
  return jnp.where(valid[..., None], d, 0.0)


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


def _logits(xs, ws, wt):
  z_s = logits_f32(xs["hs"], ws)
  z_t = logits_f32(xs["ht"], wt) if "ht" in xs else None
  return z_s, z_t


def _values_scan(hs, ws, ht, wt, targets, mask, temperature, chunk_size):
  """Forward only: per-token ce, kl (masked) and the three lse's, each [B, S]."""
  xs, _, _ = _prepare(hs, ht, targets, mask, chunk_size, ws.shape[1])

  def body(_, x):
    z_s, z_t = _logits(x, ws, wt)
    ce, kl, *lses = _chunk_values(z_s, z_t, x["tgt"], temperature)
    ce = jnp.where(x["valid"], ce, 0.0)
    kl = jnp.where(x["valid"], kl, 0.0)
    return None, (ce, kl, *lses)

  _, ys = jax.lax.scan(body, None, xs)
  s = hs.shape[1]
  return tuple(_from_chunks(y, s) for y in ys)


def _grads_scan(hs, ws, ht, wt, targets, mask, temperature, chunk_size, g_ce, g_kl, lses):
  """Backward of the token losses: recompute logits per chunk; (d hs fp32, d ws fp32)."""
  xs, c, n = _prepare(hs, ht, targets, mask, chunk_size, ws.shape[1])
  xs["g_ce"] = _to_chunks(g_ce.astype(lses[0].dtype), c, n)
  xs["g_kl"] = _to_chunks(g_kl.astype(lses[0].dtype), c, n)
  xs["lses"] = tuple(_to_chunks(v, c, n) for v in lses)
  cdt = jnp.promote_types(hs.dtype, ws.dtype)

  def body(dw_acc, x):
    z_s, z_t = _logits(x, ws, wt)
    dz = _chunk_dlogits(
      z_s, z_t, x["tgt"], x["valid"], *x["lses"], x["g_ce"], x["g_kl"], temperature
    )
    dh, dw = _grad_matmuls(x["hs"], ws, dz, cdt)
    return dw_acc + dw, dh

  dw, dh = jax.lax.scan(body, jnp.zeros(ws.shape, loss_dtype(hs, ws)), xs)
  return _from_chunks(dh, hs.shape[1]), dw


def _fused_scan(hs, ws, ht, wt, targets, mask, temperature, gamma, chunk_size):
  """Values and the gradient of sum(ce) + gamma*sum(kl) in one pass over chunks."""
  xs, _, _ = _prepare(hs, ht, targets, mask, chunk_size, ws.shape[1])
  cdt = jnp.promote_types(hs.dtype, ws.dtype)

  def body(dw_acc, x):
    z_s, z_t = _logits(x, ws, wt)
    ce, kl, *lses = _chunk_values(z_s, z_t, x["tgt"], temperature)
    ones = jnp.ones_like(ce)
    dz = _chunk_dlogits(
      z_s, z_t, x["tgt"], x["valid"], *lses, ones, gamma * ones, temperature
    )
    dh, dw = _grad_matmuls(x["hs"], ws, dz, cdt)
    ce = jnp.where(x["valid"], ce, 0.0)
    kl = jnp.where(x["valid"], kl, 0.0)
    return dw_acc + dw, (ce, kl, dh)

  dw, (ce, kl, dh) = jax.lax.scan(body, jnp.zeros(ws.shape, loss_dtype(hs, ws)), xs)
  s = hs.shape[1]
  return _from_chunks(ce, s), _from_chunks(kl, s), _from_chunks(dh, s), dw


def _teacher_zeros(ht, wt):
  if ht is None:
    return None, None
  return jnp.zeros_like(ht), jnp.zeros_like(wt)


# ----------------------------------------------------------------------------
# token losses: arbitrary per-token cotangents


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _token_losses(hs, ws, ht, wt, targets, mask, temperature, chunk_size):
  ce, kl, *_ = _values_scan(hs, ws, ht, wt, targets, mask, temperature, chunk_size)
  return ce, kl


def _token_losses_fwd(hs, ws, ht, wt, targets, mask, temperature, chunk_size):
  ce, kl, *lses = _values_scan(hs, ws, ht, wt, targets, mask, temperature, chunk_size)
  # Saved: the inputs (already alive) and three fp32 [B, S] log-sum-exps.
  return (ce, kl), (hs, ws, ht, wt, targets, mask, tuple(lses))


def _token_losses_bwd(temperature, chunk_size, res, cts):
  hs, ws, ht, wt, targets, mask, lses = res
  g_ce, g_kl = cts
  dh, dw = _grads_scan(
    hs, ws, ht, wt, targets, mask, temperature, chunk_size, g_ce, g_kl, lses
  )
  dht, dwt = _teacher_zeros(ht, wt)
  return dh.astype(hs.dtype), dw.astype(ws.dtype), dht, dwt, None, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def _check_teacher(teacher_hidden, teacher_head, student_head):
  if (teacher_hidden is None) != (teacher_head is None):
    raise ValueError("teacher_hidden and teacher_head must both be given or both be None")
  if teacher_hidden is None:
    return None, None
  if teacher_head.shape[1] != student_head.shape[1]:
    raise ValueError(
      f"teacher vocab {teacher_head.shape[1]} != student vocab {student_head.shape[1]}; "
      "slice the teacher head to the shared vocabulary first")
  return jax.lax.stop_gradient(teacher_hidden), jax.lax.stop_gradient(teacher_head)


def chunked_kd_token_losses(student_hidden: jax.Array, student_head: jax.Array,
    teacher_hidden: jax.Array | None, teacher_head: jax.Array | None, targets: jax.Array, mask: jax.Array, *,
    temperature: float, chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Chunked ``(ce_tok, kl_tok)``; same contract as ``losses.kd_token_losses``.

  Args:
    student_hidden: ``[B, S, H]`` (fp32 or bf16); student_head ``[H, V]``.
    teacher_hidden: ``[B, S, Ht]`` and teacher_head ``[Ht, V]``, or both ``None``
    (then ``kl_tok`` is zeros). No gradient reaches the teacher (zeros).
    targets: ``[B, S]`` int; mask: ``[B, S]``, a token counts iff ``mask != 0``.
    temperature: static Python float ``T``.
    chunk_size: target tokens per chunk (static); ``None`` picks
    ``default_chunk_size(V)``. The sequence is cut into pieces of
    ``max(1, chunk_size // B)`` positions.

  Returns:
    ``(ce_tok, kl_tok)`` float32 ``[B, S]``, zero where ``mask == 0``. Gradients
    w.r.t. student hidden/head come back in their input dtypes.
  """
  ht, wt = _check_teacher(teacher_hidden, teacher_head, student_head)
  return _token_losses(
    student_hidden, student_head, ht, wt, targets, mask, float(temperature), chunk_size
  )


# ----------------------------------------------------------------------------
# scalar training loss: gradient computed in the forward pass


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _loss_sum(hs, ws, ht, wt, targets, mask, temperature, gamma, chunk_size):
  ce, kl, *_ = _values_scan(hs, ws, ht, wt, targets, mask, temperature, chunk_size)
  return jnp.sum(ce) + gamma * jnp.sum(kl), ce, kl


def _loss_sum_fwd(hs, ws, ht, wt, targets, mask, temperature, gamma, chunk_size):
  ce, kl, dh, dw = _fused_scan(hs, ws, ht, wt, targets, mask, temperature, gamma, chunk_size)
  out = (jnp.sum(ce) + gamma * jnp.sum(kl), ce, kl)
  # Saved: gradients for a unit cotangent (d hidden fp32 [B,S,H], d head fp32
  # [H,V]); the per-token outputs are stop_gradient-ed by the wrapper.
  # Empty arrays carry the input dtypes (residuals must be arrays); the teacher
  # inputs are kept only for the shapes of their zero cotangents (XLA drops them).
  tags = (jnp.zeros((0,), hs.dtype), jnp.zeros((0,), ws.dtype))
  return out, (dh, dw, tags, ht, wt)


def _loss_sum_bwd(temperature, gamma, chunk_size, res, cts):
  dh, dw, (hs_tag, ws_tag), ht, wt = res
  g = cts[0]
  dht, dwt = _teacher_zeros(ht, wt)
  return (g * dh).astype(hs_tag.dtype), (g * dw).astype(ws_tag.dtype), dht, dwt, None, None


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)


def chunked_kd_loss_sum(student_hidden: jax.Array, student_head: jax.Array, teacher_hidden: jax.Array | None,
    teacher_head: jax.Array | None, targets: jax.Array, mask: jax.Array, *, temperature: float, gamma: float,
    chunk_size: int | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Training form: ``(sum(ce_tok) + gamma * sum(kl_tok), (ce_tok, kl_tok))``.

  Arguments as in ``chunked_kd_token_losses``, plus the static ``gamma``.
  Divide the first output by the global token count to get the loss of the
  contract. Only that scalar is differentiable: under ``jax.grad`` the
  forward pass already computes the gradient for a unit cotangent (no logits
  are recomputed in the backward), and ``ce_tok`` / ``kl_tok`` are
  ``stop_gradient``-ed (use them for metrics such as ``per_domain_sums``).
  Without differentiation (eval), only the values are computed.
  """
  ht, wt = _check_teacher(teacher_hidden, teacher_head, student_head)
  if ht is None:
    gamma = 0.0
  total, ce, kl = _loss_sum(
    student_hidden,
    student_head,
    ht,
    wt,
    targets,
    mask,
    float(temperature),
    float(gamma),
    chunk_size,
  )
  return total, (jax.lax.stop_gradient(ce), jax.lax.stop_gradient(kl))
