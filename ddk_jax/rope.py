"""Rotary position embeddings as Hugging Face Llama-family models apply them.

The rotation uses the "rotate half" layout (first half of the head dim paired with the
second half), which is what HF checkpoints are trained with.  Frequencies support the
scaling forms transformers names `default`, `linear` and `llama3`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> np.ndarray:
  """Returns the [head_dim // 2] inverse frequencies (float64 numpy, computed once)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
  if rope_type == "default":
    return inv_freq
  if rope_type == "linear":
    return inv_freq / float(scaling["factor"])
  if rope_type == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling["original_max_position_embeddings"])
    low_wavelen = original / low
    high_wavelen = original / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, blended, scaled)
  raise ValueError(
      f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}. "
      "Set model.rope_scaling to one of them (or None for plain RoPE).")


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates x [B, S, heads, D] by positions [B, S]; math in fp32 (or x's dtype if wider)."""
  acc = jnp.promote_types(x.dtype, jnp.float32)
  angles = positions[..., None].astype(acc) * jnp.asarray(inv_freq, acc)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(acc)
  half = x.shape[-1] // 2
  x1, x2 = xf[..., :half], xf[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
