r"""Per-device memory of a KD train step, estimated from the configs before anything runs.

    python -m ddk_jax.memory_estimate --config=configs/tinyllama_1gpu.py
    python -m ddk_jax.memory_estimate --config=configs/tinyllama.py --num_devices=16 \
        --platform=tpu --device_memory_gib=32

Counts, per device, what one optimizer step of `ddk_jax.train_step` and the DDK
controller's eval step keep alive: the student's params, grads and AdamW moments, the
frozen teacher's params (resident), then per phase (teacher forward, student forward +
loss, student backward, optimizer update, eval) the activations the student's backward
needs (set by `student.model.remat`), the working set of one layer, the chunked loss's
[tokens, vocab] blocks and the transient full copies of sharded weights.  The peak is the
resident state plus the largest phase.  Every term is a closed formula over the two
`ModelConfig`s, the micro-batch, the dtypes and the mesh (below, and in docs/gpu.md);
`compiled_step_bytes` / `compiled_eval_bytes` compile the real steps and read XLA's own
figures, which the tests compare the estimate with (within a factor 1.5).

Notation (per device): b = rows of one micro-batch on this device
(global_batch / grad_accum / data-parallel size), S = seq_len, H hidden, F intermediate,
N / K query / kv heads and D head dim (heads and F divided by the tensor axis when it
divides them), L layers, V vocab, c = bytes of the compute dtype, p = bytes of a
param dtype, keys = keys per query whose attention scores are materialised, a = bytes of
q/k/v as attention takes them, m = copies of K/V the attention keeps.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from typing import Any, Mapping, Sequence

import numpy as np

from ddk_jax import sharding
from ddk_jax.model import DTYPES, ModelConfig, param_shapes_and_axes, resolve_compute_dtype

GIB = 2**30
PLATFORMS = ("gpu", "tpu", "cpu")
# Live fp32 [chunk tokens, V] blocks in one iteration of the chunked loss's fused scan:
# student logits, teacher logits, the two tempered softmaxes and the logit gradient.
LOSS_LIVE_BLOCKS = 5


def dtype_bytes(name: str) -> int:
  return int(np.dtype(DTYPES[name]).itemsize)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the estimate depends on (build it with `setup_from_config`)."""
  student: ModelConfig
  teacher: ModelConfig | None  # None: mode cpt
  global_batch: int
  seq_len: int
  grad_accum: int = 1
  mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1})
  rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES
  platform: str = "gpu"  # resolves compute_dtype "auto" and the attention implementation
  loss_impl: str = "chunked"
  loss_chunk_size: int = 0  # 0: chunked_loss.default_chunk_size(V)
  eval_batch: int = 0  # ddk.eval_batch_size (global rows); 0: leave the eval step out

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh[a] for a in sharding.MESH_AXES)

  @property
  def data_parallel(self) -> int:
    target = dict(self.rules).get("batch") or ()
    target = (target,) if isinstance(target, str) else tuple(target)
    return math.prod(self.mesh[a] for a in target)

  @property
  def rows_per_device(self) -> int:
    """Rows of one micro-batch on one device (b)."""
    return max(1, self.global_batch // self.grad_accum // self.data_parallel)


@dataclasses.dataclass
class Estimate:
  setup: Setup
  # (component, phase, bytes per device, formula) in table order; a component alive in
  # several phases appears once per phase.
  rows: list[tuple[str, str, int, str]]
  notes: list[str]
  eval_model: str | None = None  # the model whose eval forward is the larger ("student" / "teacher")

  def phase_total(self, phase: str) -> int:
    """Bytes of one phase's rows; a train phase also counts the rows alive through the whole step."""
    extra = self._sum(TRAIN) if phase in TRAIN_PHASES else 0
    return self._sum(phase) + extra

  def _sum(self, phase: str) -> int:
    return sum(b for _, p, b, _ in self.rows if p == phase)

  @property
  def peak_phase(self) -> str:
    phases = [p for p in PHASES if any(q == p for _, q, _, _ in self.rows)]
    return max(phases, key=self.phase_total)

  @property
  def total(self) -> int:
    """Peak bytes per device: the resident state plus the largest phase."""
    return self._sum(ALWAYS) + self.phase_total(self.peak_phase)

  @property
  def train_total(self) -> int:
    """Peak of the train step alone (what XLA's analysis of the compiled step covers)."""
    return self._sum(ALWAYS) + max(self.phase_total(p) for p in TRAIN_PHASES)

  def get(self, name: str, phase: str | None = None) -> int:
    for n, p, b, _ in self.rows:
      if n == name and (phase is None or p == phase):
        return b
    raise KeyError(name)


# ---- params ---------------------------------------------------------------------------


def _fake_mesh(sizes: Mapping[str, int]):
  # sharding.logical_to_spec only reads `mesh.shape[axis]`.
  return types.SimpleNamespace(shape={a: int(sizes[a]) for a in sharding.MESH_AXES})


def shard_divisors(cfg: ModelConfig, mesh: Mapping[str, int], rules=sharding.DEFAULT_RULES) -> dict:
  """{param path: (numel, devices it is split over)}, from the same rules the trainer shards with."""
  shapes, axes = param_shapes_and_axes(cfg)
  fake = _fake_mesh(mesh)
  out = {}

  def visit(prefix, s, a):
    if isinstance(s, dict):
      for k in s:
        visit(prefix + (k,), s[k], a[k])
      return
    spec = sharding.logical_to_spec(a, s, fake, rules)
    div = 1
    for entry in spec:
      for ax in ((entry,) if isinstance(entry, str) else (entry or ())):
        div *= fake.shape[ax]
    out["/".join(prefix)] = (math.prod(s), div)

  visit((), shapes, axes)
  return out


def param_count(cfg: ModelConfig) -> int:
  """Total elements of the param tree (equals ModelConfig.num_params())."""
  return sum(n for n, _ in shard_divisors(cfg, {"data": 1, "fsdp": 1, "tensor": 1}).values())


def param_bytes_per_device(cfg: ModelConfig, mesh: Mapping[str, int], rules=sharding.DEFAULT_RULES,
                           dtype: str | None = None) -> int:
  """Bytes of this model's params on one device (each tensor's shard, in `dtype` or param_dtype)."""
  nbytes = dtype_bytes(dtype or cfg.param_dtype)
  return sum(n // d * nbytes for n, d in shard_divisors(cfg, mesh, rules).values())


# ---- activations ------------------------------------------------------------------------


def attention_kind(cfg: ModelConfig, platform: str) -> str:
  """'einsum' (blocked, fp32, CPU default), 'xla' (materialised S x S) or 'flash' (cuDNN)."""
  impl = cfg.attention_impl or ("einsum" if platform == "cpu" else "xla")
  return "flash" if impl == "cudnn" else impl


def attended_keys(kind: str, seq: int) -> float:
  """Keys per query whose scores are materialised (0 for flash attention)."""
  if kind == "flash":
    return 0.0
  if kind == "einsum":  # query blocks of ~128 rows see only the keys up to their last row
    n = max(1, min(8, seq // 128))
    return seq * (n + 1) / (2 * n)
  return float(seq)


def _heads(cfg: ModelConfig, t: int) -> tuple[int, int, int]:
  n, k = cfg.num_heads, cfg.num_kv_heads
  return (n // t if n % t == 0 else n), (k // t if k % t == 0 else k), cfg.resolved_head_dim


def _ffn(cfg: ModelConfig, t: int) -> int:
  return cfg.intermediate_size // t if cfg.intermediate_size % t == 0 else cfg.intermediate_size


def _kv_multiplicity(kind: str, seq: int) -> float:
  """The blocked einsum attention keeps a slice of K and V per query block (n blocks:
  (n + 1) / 2 copies on average); the other paths keep K and V once."""
  if kind != "einsum":
    return 1.0
  n = max(1, min(8, seq // 128))
  return (n + 1) / 2


def score_bytes(kind: str, c: int, saved: bool) -> float:
  """Bytes per materialised attention score (one query x one key x one head).

  Saved for the backward (no remat): two fp32 arrays of scores (the masked logits and
  the softmax), plus the compute-dtype probabilities that feed P.V when c < 4 in the XLA
  path (the einsum path computes in fp32).  In flight in one layer: the same plus the
  fp32 gradient of the scores.  Flash attention materialises none.
  """
  if kind == "flash":
    return 0
  kept = 8 + (c if (c < 4 and kind == "xla") else 0)
  return kept if saved else kept + 4


def layer_residual_bytes_per_token(cfg: ModelConfig, c: int, t: int, kind: str, seq: int) -> float:
  """Bytes per token one layer keeps for its backward without remat.

    (16 + 2c)H + a(N + 2mK)D + cND + 6cF + N * keys * score_bytes

  H: the layer input, x after the attention residual and the two RMSNorms' fp32 rows
  (4 x 4H), and the normed inputs of the projections (2 x cH); q, k, v as attention
  takes them (a = 4: the einsum path upcasts to fp32; else a = c; m: `_kv_multiplicity`);
  the attention output (the wo input); six [F] rows of the SwiGLU (gate, up, their
  nonlinearity's intermediates and the w_down input); the attention scores (0 for flash
  attention, which keeps its output and an fp32 log-sum-exp per head instead: cND + 4N).
  """
  n, k, d = _heads(cfg, t)
  h, f = cfg.hidden_size, _ffn(cfg, t)
  a = 4 if kind == "einsum" else c
  out = (16 + 2 * c) * h + a * (n + 2 * _kv_multiplicity(kind, seq) * k) * d + c * n * d + 6 * c * f
  if kind == "flash":
    return out + c * n * d + 4 * n
  return out + n * attended_keys(kind, seq) * score_bytes(kind, c, saved=True)


def weight_cast_bytes(cfg: ModelConfig, c: int, mesh: Mapping[str, int], rules) -> int:
  """Without remat, each projection keeps its weight as the matmul took it: a compute-dtype
  copy of every layer's weights (this device's shards) when c differs from the param dtype."""
  if c == dtype_bytes(cfg.param_dtype):
    return 0
  return sum(n // d * c for path, (n, d) in shard_divisors(cfg, mesh, rules).items()
             if path.startswith("layers/") and not path.endswith("norm"))


def _tokens(s: Setup) -> int:
  return s.rows_per_device * s.seq_len


def _compute_bytes(cfg: ModelConfig, platform: str) -> int:
  return dtype_bytes(resolve_compute_dtype(cfg.compute_dtype, platform))


def student_saved_activations(s: Setup) -> tuple[int, str]:
  """What the student's forward keeps for its backward, over all layers."""
  st, t = s.student, s.mesh["tensor"]
  L, c = st.num_layers, _compute_bytes(st, s.platform)
  kind = attention_kind(st, s.platform)
  shape = f"L={L} b={s.rows_per_device} S={s.seq_len} c={c}"
  if st.remat in ("full", "dots"):
    # `dots` (dots_with_no_batch_dims_saveable) would also keep the projections' outputs,
    # but the projections are custom-VJP calls (model._linear) whose matmuls the policy
    # does not see: measured, it keeps exactly what `full` keeps.
    why = "the scan carry only" + (" (dots saves no projection outputs: they are custom-VJP calls)"
                                   if st.remat == "dots" else "")
    return L * _tokens(s) * c * st.hidden_size, f"L*b*S*c*H: {why}; {shape}"
  per_tok = layer_residual_bytes_per_token(st, c, t, kind, s.seq_len)
  casts = weight_cast_bytes(st, c, s.mesh, s.rules)
  return (int(L * _tokens(s) * per_tok) + casts,
          f"L*b*S*((16+2c)H + a(N+2mK)D + cND + 6cF + N*keys*{score_bytes(kind, c, True):g}B)"
          f"{' + compute-dtype weight copies' if casts else ''}; {shape}, keys={attended_keys(kind, s.seq_len):g} "
          f"({kind} attention)")


def student_layer_working_set(s: Setup) -> tuple[int, str]:
  """One layer being recomputed and back-propagated: its residuals, the attention scores'
  gradient, and the activation gradients (fp32 dx, dh; compute-dtype d gate/up/act)."""
  st, t = s.student, s.mesh["tensor"]
  c = _compute_bytes(st, s.platform)
  kind = attention_kind(st, s.platform)
  n, _, _ = _heads(st, t)
  per_tok = (layer_residual_bytes_per_token(st, c, t, kind, s.seq_len)
             + n * attended_keys(kind, s.seq_len) * (score_bytes(kind, c, False) - score_bytes(kind, c, True))
             + 2 * 4 * st.hidden_size + 3 * c * _ffn(st, t))
  return int(_tokens(s) * per_tok), "b*S*(one layer's residuals + N*keys*4B score grads + 8H + 3cF)"


def forward_working_set(cfg: ModelConfig, s: Setup, rows: int) -> tuple[int, str]:
  """A forward pass without gradient (the teacher in the train step; either model in the
  eval step), over `rows` rows of this device.  Nothing is kept for a backward, so one
  layer's temporaries are alive at a time, and the attention's and the MLP's in turn:

    2cH + max(2a(N + 2mK)D + cND + N * keys * f, cH + 3cF)

  (the layer input and output; q, k, v before and after RoPE, the attention output and
  the scores, f = 12 B (XLA path: fp32 logits, fp32 softmax, the P.V input) or 6 B (the
  blocked einsum path); or the MLP's normed input, gate, up and their product).
  """
  t = s.mesh["tensor"]
  c = _compute_bytes(cfg, s.platform)
  kind = attention_kind(cfg, s.platform)
  n, k, d = _heads(cfg, t)
  a = 4 if kind == "einsum" else c
  h, f = cfg.hidden_size, _ffn(cfg, t)
  score = {"xla": 12, "einsum": 6}.get(kind, 0)
  attn = 2 * a * (n + 2 * _kv_multiplicity(kind, s.seq_len) * k) * d + c * n * d
  attn += n * attended_keys(kind, s.seq_len) * score if kind != "flash" else 4 * n
  per_tok = 2 * c * h + max(attn, c * h + 3 * c * f)
  return (int(rows * s.seq_len * per_tok),
          f"{rows}*S*(2cH + max(2a(N+2mK)D + cND + N*keys*{score}B, cH + 3cF)): no grad")


def hidden_states(s: Setup) -> tuple[int, str]:
  """The final hidden states both models hand to the loss (compute dtype)."""
  b = _tokens(s) * _compute_bytes(s.student, s.platform) * s.student.hidden_size
  if s.teacher is not None:
    b += _tokens(s) * _compute_bytes(s.teacher, s.platform) * s.teacher.hidden_size
  return b, "b*S*c*(H_student + H_teacher)"


def loss_buffers(s: Setup, rows: int | None = None, teacher: bool = True) -> tuple[int, str]:
  """The loss's [tokens, V] fp32 blocks and, in training, its fp32 head-gradient
  accumulator [H, V].  `rows`: this device's rows (default: the train micro-batch's)."""
  from ddk_jax import chunked_loss

  st, t = s.student, s.mesh["tensor"]
  train = rows is None
  rows = s.rows_per_device if train else rows
  global_rows = max(1, s.global_batch // s.grad_accum) if train else rows * s.data_parallel
  v = st.vocab_size // t if st.vocab_size % t == 0 else st.vocab_size
  # Training (fused values + gradient): LOSS_LIVE_BLOCKS with a teacher, 3 without;
  # eval (values only): the logits and their exponentials.
  blocks = (LOSS_LIVE_BLOCKS if (teacher and s.teacher is not None) else 3) if train else 2
  if s.loss_impl == "naive":
    block_tokens, what = rows * s.seq_len, "naive loss: all tokens"
  else:
    chunk = s.loss_chunk_size or chunked_loss.default_chunk_size(st.vocab_size)
    pos = max(1, min(s.seq_len, chunk // global_rows))  # positions per chunk (the chunk spans all rows)
    block_tokens, what = rows * pos, f"chunk of {chunk} tokens: {pos} positions x {rows} rows here"
  acc = 4 * st.hidden_size * v if train else 0
  return (blocks * block_tokens * v * 4 + acc,
          f"{blocks} x 4B x {block_tokens} tokens x V ({what})" + (" + 4HV head-grad accumulator" if train else ""))


def loss_hidden_grad(s: Setup) -> tuple[int, str]:
  return 4 * _tokens(s) * s.student.hidden_size, "4*b*S*H: d loss / d hidden (fp32), kept for the backward"


def _layer_bytes(cfg: ModelConfig, nbytes: int, t: int) -> int:
  per_layer = 0
  for path, (n, d) in shard_divisors(cfg, {"data": 1, "fsdp": 1, "tensor": t}).items():
    if path.startswith("layers/"):
      per_layer += n // d // cfg.num_layers * nbytes
  return per_layer


def weights_in_flight(s: Setup, cfg: ModelConfig, trained: bool) -> tuple[int, str]:
  """Copies of weights made while they are used.

  FSDP (fsdp > 1) gathers each layer in full: two layers (the one computing and the next,
  prefetched) plus the LM head in the compute dtype, and the embedding table in full (a
  gather from a vocab-sharded table does not partition); the student's backward also
  holds two layers' and the table's full fp32 grads before their reduce-scatter.  On
  unsharded weights only the compute-dtype casts count (two layers and the head), and
  only when the compute dtype differs from the param dtype.
  """
  t, f = s.mesh["tensor"], s.mesh["fsdp"]
  c, p = _compute_bytes(cfg, s.platform), dtype_bytes(cfg.param_dtype)
  v = cfg.vocab_size // t if cfg.vocab_size % t == 0 else cfg.vocab_size
  gathered = f > 1
  total = 0
  if gathered or c != p:
    total += 2 * _layer_bytes(cfg, c, t) + cfg.hidden_size * v * c
  if gathered:
    total += cfg.vocab_size * cfg.hidden_size * p
    if trained:
      total += 2 * _layer_bytes(cfg, 4, t) + cfg.vocab_size * cfg.hidden_size * 4
  if not total:
    return 0, "none: unsharded weights used in place"
  return total, ("2 layers + head in compute dtype" + (" + full embed table" if gathered else "") +
                 (" + fp32 grads of 2 layers and the table" if gathered and trained else ""))


# ---- the estimate -------------------------------------------------------------------------

ALWAYS, TRAIN = "always", "train step"
TEACHER, LOSS, BACKWARD, OPTIMIZER = "teacher fwd", "student fwd + loss", "student bwd", "optimizer"
EVAL_FWD, EVAL_LOSS = "eval fwd", "eval loss"
TRAIN_PHASES = (TEACHER, LOSS, BACKWARD, OPTIMIZER)
EVAL_PHASES = (EVAL_FWD, EVAL_LOSS)
PHASES = TRAIN_PHASES + EVAL_PHASES


def estimate(s: Setup) -> Estimate:
  """Per-device bytes: the resident state plus the largest phase.

  The train step runs the teacher forward, then the student forward with the loss (whose
  fused form also forms the loss gradient), then the student backward, then the
  optimizer update; each phase's temporaries are freed before the next starts, so their
  peaks do not add up.  The DDK controller's eval step (its own executable) runs between
  steps, on `ddk.eval_batch_size` rows, with the training state resident.
  """
  st, mesh, rules = s.student, s.mesh, s.rules
  p_student = param_bytes_per_device(st, mesh, rules)
  n_local = param_bytes_per_device(st, mesh, rules, dtype="float32") // 4
  rows: list[tuple[str, str, int, str]] = [
      ("student params", ALWAYS, p_student, f"{param_count(st) / 1e9:.3f}B x {st.param_dtype}, this device's shards"),
      # optax.adamw: mu and nu take the params' dtype (fp32 master params -> fp32 moments).
      ("optimizer state (AdamW mu, nu)", ALWAYS, 2 * p_student, f"2 x params in {st.param_dtype}"),
  ]
  if s.teacher is not None:
    rows.append(("teacher params (frozen)", ALWAYS, param_bytes_per_device(s.teacher, mesh, rules),
                 f"{param_count(s.teacher) / 1e9:.3f}B x {s.teacher.param_dtype}, this device's shards; "
                 "no grads or moments"))
  if s.grad_accum > 1:
    rows.append(("grad accumulator", TRAIN, 4 * n_local, "fp32, params' shards (grad_accum > 1)"))
  b = s.rows_per_device
  if s.teacher is not None:
    rows.append(("teacher weights in flight", TEACHER, *weights_in_flight(s, s.teacher, trained=False)))
    rows.append(("teacher forward working set", TEACHER, *forward_working_set(s.teacher, s, b)))
  saved = student_saved_activations(s)
  dh = loss_hidden_grad(s)
  s_flight_fwd = weights_in_flight(s, st, trained=False)
  s_flight = weights_in_flight(s, st, trained=True)
  rows += [
      ("student activations saved", LOSS, *saved),
      ("final hidden states", LOSS, *hidden_states(s)),
      ("loss logit blocks + head grad", LOSS, *loss_buffers(s)),
      ("loss d_hidden", LOSS, *dh),
      ("student weights in flight", LOSS, *s_flight_fwd),
      ("student activations saved", BACKWARD, *saved),
      ("loss d_hidden", BACKWARD, *dh),
      ("student weights in flight", BACKWARD, *s_flight),
      ("student grads", BACKWARD, p_student, f"params' shards and dtype ({st.param_dtype})"),
      ("student layer working set", BACKWARD, *student_layer_working_set(s)),
      ("student grads", OPTIMIZER, p_student, f"params' shards and dtype ({st.param_dtype})"),
      ("update temporaries", OPTIMIZER, 2 * 4 * n_local,
       "2 x 4B x params' shards: clipped grads and AdamW updates, when not fused away"),
  ]
  name = None
  if s.eval_batch:
    e_rows = max(1, s.eval_batch // s.data_parallel)
    # The eval step scores one model at a time; the larger of the two forwards counts.
    models = [(st, "student")] + ([(s.teacher, "teacher")] if s.teacher is not None else [])
    fwd = {name: forward_working_set(cfg, s, e_rows) for cfg, name in models}
    flight = {name: weights_in_flight(s, cfg, trained=False) for cfg, name in models}
    name = max(fwd, key=lambda n: fwd[n][0] + flight[n][0])
    cfg = dict((n, c) for c, n in models)[name]
    c = _compute_bytes(cfg, s.platform)
    loss_b, loss_f = loss_buffers(s, rows=e_rows, teacher=False)
    rows += [
        (f"{name} forward, {e_rows} eval rows", EVAL_FWD, fwd[name][0], fwd[name][1]),
        (f"{name} weights in flight", EVAL_FWD, *flight[name]),
        ("eval final hidden states", EVAL_LOSS, e_rows * s.seq_len * c * cfg.hidden_size, "rows*S*c*H"),
        ("eval CE blocks", EVAL_LOSS, loss_b, loss_f),
    ]
  notes = [
      f"mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']} ({s.num_devices} devices), "
      f"platform {s.platform}",
      f"global batch {s.global_batch} x {s.seq_len} tokens, grad_accum {s.grad_accum}: "
      f"micro-batch of {s.rows_per_device} rows x {s.seq_len} tokens per device" +
      (f"; eval batch {s.eval_batch} rows" if s.eval_batch else ""),
      f"student {param_count(st) / 1e9:.3f}B: {st.param_dtype} params, "
      f"{resolve_compute_dtype(st.compute_dtype, s.platform)} compute, remat {st.remat}, "
      f"{attention_kind(st, s.platform)} attention" +
      (f"; teacher {param_count(s.teacher) / 1e9:.3f}B: {s.teacher.param_dtype} params, "
       f"{resolve_compute_dtype(s.teacher.compute_dtype, s.platform)} compute, "
       f"{attention_kind(s.teacher, s.platform)} attention" if s.teacher is not None else "; no teacher (cpt)"),
  ]
  return Estimate(s, rows, notes, eval_model=name if s.eval_batch else None)


def setup_from_config(cfg: Any, num_devices: int, platform: str = "gpu") -> Setup:
  """A Setup from an experiment ConfigDict (configs/*.py) on `num_devices` devices."""
  student = ModelConfig.from_dict(cfg.student.model.to_dict())
  teacher = None if cfg.mode == "cpt" else ModelConfig.from_dict(cfg.teacher.model.to_dict())
  return Setup(student=student, teacher=teacher, global_batch=int(cfg.global_batch_size),
               seq_len=int(cfg.data.seq_len), grad_accum=int(cfg.optimizer.grad_accum),
               mesh=sharding.resolve_mesh_shape(cfg.mesh, num_devices),
               rules=sharding.rules_from_config(cfg.mesh.rules), platform=platform,
               loss_impl=cfg.loss.impl, loss_chunk_size=int(cfg.loss.chunk_size),
               eval_batch=int(cfg.ddk.eval_batch_size))


def format_table(est: Estimate, device_memory_bytes: int | None = None, usable_fraction: float = 1.0) -> str:
  """Markdown: the notes, then one row per component and phase, the phase sums and the peak."""
  unit, size = ("GiB", GIB) if est.total >= GIB else ("MiB", 2**20)
  g = lambda b: f"{b / size:.2f}"
  lines = [f"* {n}" for n in est.notes]
  lines += ["", f"| component | phase | {unit} / device | formula |", "|---|---|---:|---|"]
  for name, phase, nbytes, formula in est.rows:
    lines.append(f"| {name} | {phase} | {g(nbytes)} | {formula} |")
  lines.append(f"| *resident (always)* | | {g(est._sum(ALWAYS))} | |")
  for phase in PHASES:
    if any(p == phase for _, p, _, _ in est.rows):
      lines.append(f"| *phase: {phase}* | | {g(est.phase_total(phase))} | "
                   f"{'with the train-step rows' if phase in TRAIN_PHASES and est._sum(TRAIN) else ''} |")
  lines.append(f"| **peak = resident + largest phase ({est.peak_phase})** | | **{g(est.total)}** | |")
  if device_memory_bytes:
    usable = device_memory_bytes * usable_fraction
    lines.append(f"| device memory x {usable_fraction:g} usable | | {g(usable)} | of {g(device_memory_bytes)} |")
    verdict = "fits" if est.total <= usable else "DOES NOT FIT"
    lines.append(f"| headroom | | {g(usable - est.total)} | {verdict} |")
  return "\n".join(lines)


# ---- XLA's figure for the real step ---------------------------------------------------------


def compiled_step_bytes(s: Setup, devices=None, num_domains: int = 3) -> dict[str, int]:
  """Compiles the real train step for `s` (abstract inputs, nothing allocated) and returns
  XLA's per-device memory analysis: arguments, outputs, aliased, temporaries, and
  peak = arguments + outputs - aliased + temporaries.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh

  from ddk_jax import model as model_lib, train_step as ts

  devices = list(devices if devices is not None else jax.devices())
  if len(devices) < s.num_devices:
    raise ValueError(f"compiling the step needs the mesh's {s.num_devices} devices; this host has {len(devices)}")
  shape = tuple(s.mesh[a] for a in sharding.MESH_AXES)
  mesh = Mesh(np.asarray(devices[:s.num_devices]).reshape(shape), sharding.MESH_AXES)
  rules = tuple(s.rules)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1))
  opts = ts.StepOptions(num_domains=num_domains, mode="kd" if s.teacher is not None else "cpt",
                        grad_accum=s.grad_accum, loss_impl=s.loss_impl, loss_chunk_size=s.loss_chunk_size)

  def abstract(cfg):
    shapes, _ = model_lib.param_shapes_and_axes(cfg)
    sh = ts.params_shardings(cfg, mesh, rules)
    dt = DTYPES[cfg.param_dtype]
    return sh, jax.tree.map(lambda x, y: jax.ShapeDtypeStruct(x, dt, sharding=y), shapes, sh,
                            is_leaf=lambda x: isinstance(x, tuple))

  s_sh, s_abs = abstract(s.student)
  t_sh, t_abs = abstract(s.teacher) if s.teacher is not None else (None, None)
  state_sh = ts.state_shardings(s_sh, optimizer, s_abs, mesh)
  state_abs = jax.eval_shape(lambda p: ts.init_train_state(p, optimizer), s_abs)
  state_abs = jax.tree.map(lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), state_abs, state_sh)
  b_sh = ts.batch_shardings(mesh, rules)
  # Row arrays ([B]: domain_id) and token arrays ([B, S]); their shardings give the rank.
  batch_abs = {k: jax.ShapeDtypeStruct((s.global_batch, s.seq_len)[:len(sh.spec)], jnp.int32, sharding=sh)
               for k, sh in b_sh.items()}
  step = ts.jit_train_step(ts.make_train_step(s.student, s.teacher, optimizer, opts), state_sh, t_sh, mesh, rules)
  ma = step.lower(state_abs, t_abs, batch_abs).compile().memory_analysis()
  out = {"arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
         "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def compiled_eval_bytes(s: Setup, which: str = "teacher", devices=None, num_domains: int = 3) -> dict[str, int]:
  """XLA's per-device memory analysis of the eval step (`ddk.eval_batch_size` rows) of one
  model, `which` = "student" or "teacher"; same keys as `compiled_step_bytes`."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh

  from ddk_jax import model as model_lib, train_step as ts

  cfg = s.teacher if which == "teacher" else s.student
  devices = list(devices if devices is not None else jax.devices()[:s.num_devices])
  mesh = Mesh(np.asarray(devices[:s.num_devices]).reshape(tuple(s.mesh[a] for a in sharding.MESH_AXES)),
              sharding.MESH_AXES)
  rules = tuple(s.rules)
  shapes, _ = model_lib.param_shapes_and_axes(cfg)
  p_sh = ts.params_shardings(cfg, mesh, rules)
  p_abs = jax.tree.map(lambda x, y: jax.ShapeDtypeStruct(x, DTYPES[cfg.param_dtype], sharding=y), shapes, p_sh,
                       is_leaf=lambda x: isinstance(x, tuple))
  b_sh = ts.batch_shardings(mesh, rules)
  batch_abs = {k: jax.ShapeDtypeStruct((s.eval_batch, s.seq_len)[:len(sh.spec)], jnp.int32, sharding=sh)
               for k, sh in b_sh.items()}
  opts = ts.StepOptions(num_domains=num_domains, mode="cpt", loss_impl=s.loss_impl,
                        loss_chunk_size=s.loss_chunk_size)
  fn = ts.jit_eval_step(ts.make_eval_step(cfg, opts), p_sh, mesh, rules)
  ma = fn.lower(p_abs, batch_abs).compile().memory_analysis()
  out = {"arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
         "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


# ---- CLI ---------------------------------------------------------------------------------


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
  flags.DEFINE_integer("num_devices", None, "Devices the run uses (default: the mesh's fixed sizes, or this "
                       "host's device count when an axis is -1).")
  flags.DEFINE_enum("platform", "gpu", list(PLATFORMS), "Resolves compute_dtype 'auto' and the attention path.")
  flags.DEFINE_float("device_memory_gib", None, "Memory of one device, GiB (80 GB H100: 79.1; TPU v4: 32; "
                     "v5p: 95); prints the headroom.")
  flags.DEFINE_float("usable_fraction", 0.9, "Share of the device memory the step may use (XLA's allocator, "
                     "the runtime and fragmentation take the rest).")
  flags.DEFINE_bool("compile", False, "Also compile the real step on this host's devices and print XLA's "
                    "memory analysis (needs the mesh's device count here).")
  return flags.FLAGS


def _parse_flags(argv):
  from absl import flags
  try:
    args = flags.FLAGS(argv)
    if flags.FLAGS.config is not None:
      flags.FLAGS.config.get("mode")  # a config file that failed to load raises here, not above
    return args
  except (AttributeError, KeyError) as e:
    key = str(e).strip("\"'")
    print(f"memory_estimate: unknown config key {key!r} in a --config.<key>=<value> flag (keys: docs/config.md)",
          file=sys.stderr)
  except (flags.Error, ValueError, TypeError, OSError) as e:
    print(f"memory_estimate: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the layout
  sys.exit(2)


def _main(argv) -> None:
  from absl import flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    print(f"memory_estimate: unexpected arguments {argv[1:]}; config overrides are written "
          "--config.<key>=<value>", file=sys.stderr)
    sys.exit(2)
  cfg = FLAGS.config
  if cfg is None:
    print("memory_estimate: --config is required, e.g. --config=configs/tinyllama_1gpu.py", file=sys.stderr)
    sys.exit(2)
  num_devices = FLAGS.num_devices
  if num_devices is None:
    sizes = [int(cfg.mesh[a]) for a in sharding.MESH_AXES]
    if -1 in sizes:
      import jax
      num_devices = jax.device_count()
    else:
      num_devices = math.prod(sizes)
  try:
    s = setup_from_config(cfg, num_devices, FLAGS.platform)
    est = estimate(s)
  except (ValueError, KeyError) as e:
    print(f"memory_estimate: {e}", file=sys.stderr)
    sys.exit(2)
  mem = int(FLAGS.device_memory_gib * GIB) if FLAGS.device_memory_gib else None
  print(format_table(est, mem, FLAGS.usable_fraction))
  if FLAGS.compile:
    try:
      xla = compiled_step_bytes(s)
    except ValueError as e:
      print(f"memory_estimate: --compile: {e}", file=sys.stderr)
      sys.exit(2)
    print(f"\nXLA memory analysis of the compiled step on this host: peak {xla['peak'] / 2**20:,.1f} MiB per device "
          f"(arguments {xla['arguments'] / 2**20:,.1f}, outputs {xla['outputs'] / 2**20:,.1f}, aliased "
          f"{xla['aliased'] / 2**20:,.1f}, temporaries {xla['temporaries'] / 2**20:,.1f}); estimate / XLA = "
          f"{est.train_total / max(xla['peak'], 1):.2f} (train step; the eval phase is not part of it)")


def run() -> None:
  from absl import app
  _define_flags()
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
