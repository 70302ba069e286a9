"""One jitted, packed forward for downstream evaluation, and what is built on it: summed
log-likelihoods of token continuations and greedy decoding.

Every call runs the same compiled function on `[batch_size, seq_len]` rows (several
sequences per row, segment ids and per-sequence positions, so attention never crosses
sequences); the last batch is padded with empty rows, so nothing recompiles.  The forward
returns, per token, the log-probability of the target token and the arg-max token id;
scores and greedy flags are summed on the host from those two `[B, S]` arrays, never from
the `[B, S, V]` logits.

Multi-host: every process must run the jitted forward on the same global batches.
Process 0 (which drives the evaluation) broadcasts each batch with
`multihost_utils.broadcast_one_to_all` before running it; the other processes call
`serve()`, which receives batches and runs them until process 0 calls `stop()`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddk_jax import model as model_lib, sharding as sharding_lib
from ddk_jax.downstream.packing import ROW_KEYS, empty_batch, pack_lengths, packed_batches
from ddk_jax.model import ModelConfig

_log = logging.getLogger("ddk_jax.downstream")

# Commands process 0 broadcasts ahead of each batch.
_STOP, _RUN, _ABORT = 0, 1, 2
# Largest [rows, chunk, vocab] float32 logits block the forward materialises at once.
_LOGITS_BLOCK_BYTES = 256 * 2**20


class EvaluationAborted(RuntimeError):
  """Process 0 stopped with an error while the other processes were serving it."""


def _params_mesh(params: Any) -> Mesh | None:
  for leaf in jax.tree.leaves(params):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, NamedSharding):
      return sh.mesh
  return None


def _seq_chunk(seq_len: int, rows: int, vocab: int) -> int:
  """Positions per block of the head matmul: all of them unless the logits block is big."""
  chunk = seq_len
  while chunk % 2 == 0 and rows * chunk * vocab * 4 > _LOGITS_BLOCK_BYTES:
    chunk //= 2
  return chunk


def make_forward(cfg: ModelConfig, seq_chunk: int) -> Callable:
  """`f(params, inputs, positions, segment_ids, targets) -> (target logprob [B, S] f32,
  arg-max token [B, S] i32)`, not jitted.  The head runs over `seq_chunk` positions at a time."""

  def forward(params, inputs, positions, segment_ids, targets):
    hidden = model_lib.apply_hidden(params, cfg, inputs, positions, segment_ids)
    head = model_lib.head_weight(params, cfg)
    b, s, h = hidden.shape
    n = s // seq_chunk
    hs = hidden.reshape(b, n, seq_chunk, h).swapaxes(0, 1)
    ts = targets.reshape(b, n, seq_chunk).swapaxes(0, 1)

    def block(_, x):
      hc, tc = x
      logits = jnp.einsum("bsh,hv->bsv", hc, head.astype(hc.dtype), preferred_element_type=jnp.float32)
      logz = jax.nn.logsumexp(logits, axis=-1)
      picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
      return None, (picked - logz, jnp.argmax(logits, axis=-1).astype(jnp.int32))

    _, (logprob, argmax) = jax.lax.scan(block, None, (hs, ts))
    return logprob.swapaxes(0, 1).reshape(b, s), argmax.swapaxes(0, 1).reshape(b, s)

  return forward


class PackedForward:
  """The compiled forward over fixed `[batch_size, seq_len]` packed rows.

  Args:
    params, cfg: the model (our param tree and its ModelConfig).
    seq_len: tokens per row; the longest sequence that can be scored.
    batch_size: rows per forward, over all processes (rounded up to a multiple of the
      data-parallel size of the mesh).
    mesh, rules: where the params live and how batches are split (logical-axis rules,
      default `sharding.DEFAULT_RULES`).  None: the mesh of the params when they are
      placed on one (e.g. `restore_student_params` / `load_hf_checkpoint(mesh=...)`), else
      a single device; several processes need a mesh.
  """

  def __init__(self, params: Any, cfg: ModelConfig, *, seq_len: int, batch_size: int, mesh: Mesh | None = None,
               rules=None):
    if seq_len < 2 or batch_size < 1:
      raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    self.cfg = cfg
    self.seq_len = int(seq_len)
    self.rules = tuple(rules) if rules is not None else sharding_lib.DEFAULT_RULES
    self.mesh = mesh if mesh is not None else _params_mesh(params)
    self.params = params
    self.num_processes = jax.process_count()
    if self.num_processes > 1 and self.mesh is None:
      raise ValueError("several processes: the params must be placed on a mesh spanning them (load them with "
                       "mesh=..., or pass mesh=) so every process runs its part of each batch")
    dp = sharding_lib.data_parallel_size(self.mesh, self.rules) if self.mesh is not None else 1
    self.batch_size = -(-int(batch_size) // dp) * dp
    if self.batch_size != batch_size:
      _log.info("batch_size %d rounded up to %d rows (a multiple of the %d-way data-parallel mesh)", batch_size,
                self.batch_size, dp)
    chunk = _seq_chunk(self.seq_len, self.batch_size // dp, cfg.vocab_size)
    forward = make_forward(cfg, chunk)
    if self.mesh is None:
      self._batch_sharding = None
      self._fn = jax.jit(forward)
    else:
      mesh, rules = self.mesh, self.rules

      def wrapped(*args):
        with sharding_lib.activation_sharding(mesh, rules):
          return forward(*args)

      self._batch_sharding = sharding_lib.batch_sharding(mesh, rules, 2)
      replicated = NamedSharding(mesh, P())
      self._fn = jax.jit(wrapped, out_shardings=(replicated, replicated))
    self.forward_calls = 0

  @property
  def params(self) -> Any:
    return self._params

  @params.setter
  def params(self, params: Any) -> None:
    """New values of the same model; host arrays are put on the device once, here."""
    self._params = params if self.mesh is not None else jax.device_put(params)

  # -- running batches ---------------------------------------------------------------

  def _place(self, x: np.ndarray):
    if self._batch_sharding is None:
      return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, self._batch_sharding, lambda idx: x[idx])

  def _run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    args = [self._place(np.asarray(batch[k], np.int32)) for k in ("inputs", "positions", "segment_ids", "targets")]
    logprob, argmax = self._fn(self.params, *args)
    self.forward_calls += 1
    return np.asarray(logprob), np.asarray(argmax)

  def _exchange(self, command: int, batch: dict[str, np.ndarray] | None = None):
    header = np.array([command], np.int32)
    if batch is None:
      batch = empty_batch(self.batch_size, self.seq_len)
    from jax.experimental import multihost_utils
    header, batch = multihost_utils.broadcast_one_to_all((header, batch))
    return int(header[0]), batch

  def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Runs one batch (process 0 / a single process); returns (target logprob, arg-max), [B, S]."""
    for k in ROW_KEYS:
      if batch[k].shape != (self.batch_size, self.seq_len):
        raise ValueError(f"batch[{k!r}] has shape {batch[k].shape}, expected {(self.batch_size, self.seq_len)}")
    if self.num_processes > 1:
      if jax.process_index() != 0:
        raise RuntimeError("only process 0 submits batches; the other processes call serve()")
      self._exchange(_RUN, batch)
    return self._run(batch)

  def serve(self) -> int:
    """On processes other than 0: run the batches process 0 submits until it calls `stop()`.

    Returns the number of batches run; raises EvaluationAborted when process 0 stopped with
    an error.  A no-op in a single process.
    """
    if self.num_processes == 1:
      return 0
    if jax.process_index() == 0:
      raise RuntimeError("process 0 drives the evaluation; serve() is for the other processes")
    done = 0
    while True:
      command, batch = self._exchange(_RUN)
      if command == _STOP:
        return done
      if command == _ABORT:
        raise EvaluationAborted("process 0 stopped the evaluation with an error (see its log)")
      self._run(batch)
      done += 1

  def stop(self, ok: bool = True) -> None:
    """On process 0: release the processes in `serve()` (a no-op in a single process)."""
    if self.num_processes > 1 and jax.process_index() == 0:
      self._exchange(_STOP if ok else _ABORT)

  # -- what is built on the forward --------------------------------------------------

  def score(self, sequences: Sequence[tuple[Sequence[int], int]],
            progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """Summed log-probability of the last `n` tokens of each `(tokens, n)`, and whether each of
    them is the arg-max prediction (greedy), with the model reading `tokens[:-1]`.

    `len(tokens) - 1` must be at most `seq_len` and `1 <= n < len(tokens)`.
    `progress(k)` is called after each batch with the number of sequences it scored.
    """
    inputs, targets = [], []
    for i, (tokens, n) in enumerate(sequences):
      tokens = np.asarray(tokens, np.int32)
      if not 1 <= n < len(tokens):
        raise ValueError(f"sequence {i}: {n} scored tokens out of {len(tokens)}; need 1 <= n < len(tokens)")
      if len(tokens) - 1 > self.seq_len:
        raise ValueError(f"sequence {i}: {len(tokens) - 1} input tokens do not fit a row of seq_len={self.seq_len}")
      inputs.append(tokens[:-1])
      targets.append(tokens[1:])
    out: list[tuple[float, bool]] = [(0.0, True)] * len(inputs)
    for batch, slots in packed_batches(inputs, targets, seq_len=self.seq_len, batch_size=self.batch_size):
      logprob, argmax = self(batch)
      for s in slots:
        n = sequences[s.index][1]
        lo, hi = s.start + s.length - n, s.start + s.length
        greedy = bool(np.all(argmax[s.row, lo:hi] == batch["targets"][s.row, lo:hi]))
        out[s.index] = (float(np.sum(logprob[s.row, lo:hi], dtype=np.float64)), greedy)
      if progress is not None:
        progress(len(slots))
    return out

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
               should_stop: Callable[[int, list[int]], bool] | None = None,
               progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy decoding without a KV cache: each new token is one forward over the batch.

    Each prompt gets a slot of `len(prompt) + max_new_tokens[i]` tokens (so the positions of
    the tokens still to come are reserved); slots are packed like scoring requests.  A
    sequence ends after `max_new_tokens[i]` tokens or when `should_stop(i, generated)` says
    so; a batch ends when all of its sequences have.  Returns the generated ids.
    """
    lengths = []
    for i, (p, m) in enumerate(zip(prompts, max_new_tokens)):
      if not p or m < 1:
        raise ValueError(f"prompt {i}: needs at least one prompt token and max_new_tokens >= 1")
      if len(p) + m > self.seq_len:
        raise ValueError(f"prompt {i}: {len(p)} prompt + {m} new tokens do not fit a row of seq_len={self.seq_len}")
      lengths.append(len(p) + m)
    rows = pack_lengths(lengths, self.seq_len)
    out: list[list[int]] = [[] for _ in prompts]
    for first in range(0, len(rows), self.batch_size):
      batch = empty_batch(self.batch_size, self.seq_len)
      active = []  # [index, row, start, filled]
      for r, members in enumerate(rows[first:first + self.batch_size]):
        start = 0
        for seg, i in enumerate(members, start=1):
          n, p = lengths[i], np.asarray(prompts[i], np.int32)
          batch["inputs"][r, start:start + len(p)] = p
          batch["positions"][r, start:start + n] = np.arange(n, dtype=np.int32)
          batch["segment_ids"][r, start:start + n] = seg
          active.append([i, r, start, len(p)])
          start += n
      count = len(active)
      while active:
        _, argmax = self(batch)
        still = []
        for slot in active:
          i, r, start, filled = slot
          token = int(argmax[r, start + filled - 1])
          out[i].append(token)
          if len(out[i]) >= max_new_tokens[i] or (should_stop is not None and should_stop(i, out[i])):
            continue
          batch["inputs"][r, start + filled] = token
          slot[3] = filled + 1
          still.append(slot)
        active = still
      if progress is not None:
        progress(count)
    return out
