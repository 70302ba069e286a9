"""Model FLOPs of a KD step (MaxText's accounting) and the hardware peak they are divided by.

Matmul FLOPs per token: forward = 2 * (matmul params) + causal attention
(2 matmuls of S/2 average keys each: 2 * 2 * S/2 * N * D per layer); training = 3x
forward for the student; the teacher runs forward only.  Embedding gathers are free,
the LM head is a matmul and counts.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddk_jax.model import ModelConfig, resolve_compute_dtype

# Dense bf16 peaks per chip, used when the device kind is recognised.
# H100: the measured throughput of a dense 8192^3 bf16 matmul, not the datasheet figure.
KNOWN_PEAKS_TFLOPS = {
    "H100": 790.0,
    "H200": 790.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6": 918.0,
}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  matmul_params = cfg.num_params(include_embedding=False)
  attention = cfg.num_layers * 2 * 2 * (seq_len / 2) * cfg.num_heads * cfg.resolved_head_dim
  return 2.0 * matmul_params + attention


def kd_step_flops(student: ModelConfig, teacher: ModelConfig | None, tokens: int, seq_len: int) -> float:
  """Model FLOPs of one train step over `tokens` tokens (student fwd+bwd, teacher fwd)."""
  flops = 3.0 * forward_flops_per_token(student, seq_len)
  if teacher is not None:
    flops += forward_flops_per_token(teacher, seq_len)
  return flops * tokens


def time_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted n x n matmul on device 0 (fp32 accumulation), best of `repeats`.

  Not cached: benchmarks call it several times in a run and keep the best (the machine
  may be shared).  bf16 inputs accumulate in fp32 (`preferred_element_type`), the form
  the model's matmuls use.
  """
  dt = jnp.dtype(dtype)
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt)
  f = _matmul_f32_acc
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


@jax.jit
def _matmul_f32_acc(x, y):
  return jnp.matmul(x, y, preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """`time_matmul_peak`, measured once per process and argument set."""
  return time_matmul_peak(dtype, n, repeats)


def peak_flops_per_device(compute_dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of one device, how it was obtained); `compute_dtype` may be "auto"."""
  compute_dtype = resolve_compute_dtype(compute_dtype, jax.devices()[0].platform)
  kind = jax.devices()[0].device_kind
  for name, tflops in KNOWN_PEAKS_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12, f"{kind} table ({tflops:.0f} TFLOP/s bf16)"
  if jax.devices()[0].platform == "cpu":
    # All emulated CPU devices share the same cores: the host's peak is split among them.
    peak = measured_matmul_peak(compute_dtype) / jax.local_device_count()
    return peak, f"measured {compute_dtype} matmul on this CPU"
  return float("nan"), f"unknown device kind {kind!r}"
