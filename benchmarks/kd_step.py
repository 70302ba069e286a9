r"""Tokens/s and MFU of the ddk_jax KD train step against the same step in PyTorch.

    .venv/bin/python benchmarks/kd_step.py                 # the issue's CPU pair (see --help)
    .venv/bin/python benchmarks/kd_step.py --quick         # tiny smoke run (seconds)
    .venv/bin/python benchmarks/kd_step.py --preset gpu_tinyllama   # on a GPU machine

What runs, all in one process and one run:

* ``ddk_jax bf16``: ``ddk_jax.train_step.make_train_step`` + ``jit_train_step`` on a
  one-device mesh; the student keeps fp32 params (and fp32 AdamW state) and computes in
  bf16 with fp32 accumulation, the frozen teacher is stored and run in bf16; the CE + KD
  loss is the step's default (``loss_impl='chunked'``).  This is the configuration
  ``compute_dtype='auto'`` resolves to (docs/performance.md).
* ``ddk_jax fp32``: the same step with every param and every matmul in fp32.
* ``torch fp32`` / ``torch bf16-autocast``: the step as a PyTorch user writes it:
  ``transformers.LlamaForCausalLM`` teacher (``eval()``, ``torch.no_grad()``) and student,
  eager, ``F.cross_entropy`` + ``F.kl_div(F.log_softmax(...), ..., reduction='batchmean')``,
  ``clip_grad_norm_``, ``torch.optim.AdamW``, ``backward`` / ``step`` / ``zero_grad``; once
  in fp32 and once with the forwards and the loss under
  ``torch.autocast(device, dtype=torch.bfloat16)``.

Both sides compute the same thing: ``CE + gamma * T^2 * KL(teacher || student)``
averaged over the batch's tokens (rows are full single documents, no padding, so
``batchmean`` over the flattened tokens is our token mean), AdamW with weight decay 0.1
and global-norm clipping at 1.0.  With ``--same_init`` (default on CPU) the PyTorch
models get our initial weights, and the first-step losses printed agree.

Timing: every implementation is compiled / warmed up first (``--warmup`` steps, excluded),
then ``--rounds`` rounds each run ``--steps`` timed steps of every implementation in
turn (the order rotates per round), so load from other processes on the machine hits
all of them alike.  The reported step time is the median over all timed steps.  The
matmul peaks (f32, and bf16 inputs with f32 accumulation, ``ddk_jax.flops``) are
measured between rounds in the same run; the best is used.  Model FLOPs are
``ddk_jax.flops.kd_step_flops`` (student fwd+bwd, teacher fwd, causal attention counted
as MaxText does); MFU = model FLOPs / (step time * peak of the compute dtype used).

Threads: JAX's CPU client and PyTorch both use every core of the machine
(``torch.set_num_threads(os.cpu_count())``, XLA's default intra-op pool).

XLA flags: this script sets nothing unusual; ``--xla_flags`` appends to ``XLA_FLAGS``
before JAX is imported (the flags are printed with the results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Model shapes: (layers, hidden, heads, kv_heads, head_dim, intermediate).
PRESETS = {
    # The CPU pair: an 8 x 512 teacher (36.4M params with embeddings) and a 4 x 256
    # student (7.4M); intermediate ~2.69x hidden as in Llama-2 (11008 / 4096).
    "cpu": dict(teacher=(8, 512, 8, 8, 64, 1376), student=(4, 256, 4, 4, 64, 688),
                vocab=8192, seq=256, batch=8, warmup=3, steps=3, rounds=4),
    # Smoke test: seconds.
    "quick": dict(teacher=(2, 128, 2, 2, 64, 344), student=(2, 64, 1, 1, 64, 172),
                  vocab=1024, seq=64, batch=4, warmup=2, steps=2, rounds=2),
    # Issue part 5: Llama-2-7B-shaped teacher, TinyLlama-1.1B-shaped student (random
    # weights), vocab 32000, seq 2048.  PyTorch sides are off by default there.
    "gpu_tinyllama": dict(teacher=(32, 4096, 32, 32, 128, 11008), student=(22, 2048, 32, 4, 64, 5632),
                          vocab=32000, seq=2048, batch=8, warmup=3, steps=5, rounds=2,
                          impls="jax_auto", remat="dots", same_init=False),
}
ALL_IMPLS = ("jax_auto", "jax_bf16", "jax_f32", "torch_fp32", "torch_bf16")
DEFAULT_IMPLS = "jax_auto,jax_bf16,torch_fp32,torch_bf16"
LABELS = {"jax_auto": ("ddk_jax", "auto"), "jax_bf16": ("ddk_jax", "bf16 compute"), "jax_f32": ("ddk_jax", "fp32"),
          "torch_fp32": ("torch eager", "fp32"), "torch_bf16": ("torch eager", "bf16 autocast")}
# Dtype the matmuls run in ("auto" is resolved on the platform at run time).
COMPUTE = {"jax_auto": "auto", "jax_bf16": "bfloat16", "jax_f32": "float32", "torch_fp32": "float32",
           "torch_bf16": "bfloat16"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  p.add_argument("--quick", action="store_true", help="alias for --preset quick")
  for who in ("teacher", "student"):
    p.add_argument(f"--{who}_layers", type=int)
    p.add_argument(f"--{who}_hidden", type=int)
    p.add_argument(f"--{who}_heads", type=int)
    p.add_argument(f"--{who}_kv_heads", type=int)
    p.add_argument(f"--{who}_head_dim", type=int)
    p.add_argument(f"--{who}_intermediate", type=int)
  p.add_argument("--vocab", type=int)
  p.add_argument("--seq", type=int)
  p.add_argument("--batch", type=int)
  p.add_argument("--warmup", type=int, help="untimed steps per implementation (compilation included)")
  p.add_argument("--steps", type=int, help="timed steps per implementation per round")
  p.add_argument("--rounds", type=int, help="interleaved rounds")
  p.add_argument("--impls", help=f"comma list from {','.join(ALL_IMPLS)} (default: all on CPU)")
  p.add_argument("--gamma", type=float, default=1.0)
  p.add_argument("--temperature", type=float, default=1.0)
  # ddk_jax knobs (defaults: the library's defaults)
  p.add_argument("--loss_impl", default="chunked", choices=("chunked", "naive"))
  p.add_argument("--chunk_size", type=int, default=0, help="loss chunk (tokens); 0: library default")
  p.add_argument("--scan_layers", type=int, choices=(0, 1), help="default: the ModelConfig default")
  p.add_argument("--remat", choices=("none", "full", "dots"))
  p.add_argument("--attention_impl", default="", help="ModelConfig.attention_impl")
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before JAX starts")
  # PyTorch knobs
  p.add_argument("--torch_device", default="", help="default: cuda if available, else cpu")
  p.add_argument("--torch_attn", default="sdpa", help="transformers attn_implementation")
  p.add_argument("--same_init", type=int, choices=(0, 1), help="copy our initial weights into the torch models")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="bf16 peak on accelerators (default: ddk_jax.flops table, H100 790)")
  p.add_argument("--json", default="", help="also write the results here")
  args = p.parse_args(argv)
  if args.quick:
    args.preset = "quick"
  preset = PRESETS[args.preset]
  for key in ("vocab", "seq", "batch", "warmup", "steps", "rounds"):
    if getattr(args, key) is None:
      setattr(args, key, preset[key])
  if args.remat is None:
    args.remat = preset.get("remat", "none")
  if args.same_init is None:
    args.same_init = int(preset.get("same_init", True))
  args.impls = (args.impls or preset.get("impls") or DEFAULT_IMPLS).split(",")
  for impl in args.impls:
    if impl not in ALL_IMPLS:
      p.error(f"--impls: {impl!r} is not one of {ALL_IMPLS}")
  args.shapes = {}
  for who in ("teacher", "student"):
    shape = list(preset[who])
    for i, key in enumerate(("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate")):
      v = getattr(args, f"{who}_{key}")
      if v is not None:
        shape[i] = v
    args.shapes[who] = tuple(shape)
  return args


# ----------------------------------------------------------------------------- ddk_jax side


def model_configs(args, compute: str):
  from ddk_jax.model import ModelConfig
  out = {}
  for who in ("teacher", "student"):
    layers, hidden, heads, kv, hd, inter = args.shapes[who]
    kw = dict(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
              num_heads=heads, num_kv_heads=kv, head_dim=hd, max_position_embeddings=max(args.seq, 4096),
              remat=args.remat if who == "student" else "none", attention_impl=args.attention_impl)
    if args.scan_layers is not None:
      kw["scan_layers"] = bool(args.scan_layers)
    if compute == "float32":  # everything fp32
      kw.update(param_dtype="float32", compute_dtype="float32")
    else:  # mixed precision (issue part 4): bf16 teacher params, fp32 student params
      kw.update(param_dtype="bfloat16" if who == "teacher" else "float32", compute_dtype=compute)
    out[who] = ModelConfig(**kw)
  return out["teacher"], out["student"]


def make_batch(args, num_domains: int):
  import numpy as np
  rng = np.random.default_rng(0)
  ids = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
  return {
      "inputs": ids[:, :-1].copy(),
      "targets": ids[:, 1:].copy(),
      "segment_ids": np.ones((args.batch, args.seq), np.int32),  # one document per row, no padding
      "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1)),
      "domain_id": (np.arange(args.batch) % num_domains).astype(np.int32),
  }


def optimizer_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=0, schedule="constant", min_lr_ratio=0.1,
                                        weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0))


class JaxRunner:
  """One jitted ddk_jax KD step on a one-device mesh; `step()` runs one and blocks."""

  def __init__(self, args, compute: str, init_params=None):
    import jax
    from ddk_jax import optim, sharding, train_step as ts
    self.teacher_cfg, self.student_cfg = model_configs(args, compute)
    num_domains = 4
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    optimizer = optim.make_optimizer(optimizer_config(), total_steps=1000)
    opts = ts.StepOptions(num_domains=num_domains, mode="kd", gamma=args.gamma, temperature=args.temperature,
                          loss_impl=args.loss_impl, loss_chunk_size=args.chunk_size)
    s_sh = ts.params_shardings(self.student_cfg, mesh, rules)
    t_sh = ts.params_shardings(self.teacher_cfg, mesh, rules)
    if init_params is None:
      params = ts.init_params_sharded(self.student_cfg, jax.random.key(0), s_sh)
      teacher = ts.init_params_sharded(self.teacher_cfg, jax.random.key(1), t_sh)
    else:  # the same initial weights as another runner, in this runner's param dtypes
      params = jax.device_put(cast_tree(init_params[0], self.student_cfg.param_dtype), s_sh)
      teacher = jax.device_put(cast_tree(init_params[1], self.teacher_cfg.param_dtype), t_sh)
    state_sh = ts.state_shardings(s_sh, optimizer, params, mesh)
    self.state = jax.jit(lambda p: ts.init_train_state(p, optimizer), out_shardings=state_sh)(params)
    self.teacher = teacher
    self._step = ts.jit_train_step(ts.make_train_step(self.student_cfg, self.teacher_cfg, optimizer, opts),
                                   state_sh, t_sh, mesh, rules)
    self.batch = sharding.host_batch_to_global(make_batch(args, num_domains), mesh, rules)
    self.first_loss = None

  def initial_params_host(self):
    import jax
    return jax.device_get((self.state["params"], self.teacher))

  def step(self) -> float:
    import jax
    t = time.perf_counter()
    self.state, metrics = self._step(self.state, self.teacher, self.batch)
    loss = jax.block_until_ready(metrics["loss"])
    dt = time.perf_counter() - t
    if self.first_loss is None:
      self.first_loss = float(loss)
    return dt


def cast_tree(tree, dtype: str):
  import jax
  import numpy as np
  from ddk_jax.model import DTYPES
  return jax.tree.map(lambda x: np.asarray(x).astype(DTYPES[dtype]), tree)


# ----------------------------------------------------------------------------- PyTorch side


def torch_state_dict(params, cfg):
  """Our param tree -> a transformers Llama state dict (inverse of ddk_jax.hf's mapping)."""
  import numpy as np
  import torch
  from ddk_jax.hf.hf_import import param_mapping
  sd = {}
  for m in param_mapping(cfg):
    x = params
    for k in m.path:
      x = x[k]
    x = np.asarray(x, np.float32)
    inv = np.argsort(m.perm)
    for i, name in enumerate(m.names(cfg.num_layers)):
      t = (x[i] if m.stacked else x).transpose(inv).reshape(m.hf_shape)
      sd[name] = torch.from_numpy(np.array(t, np.float32, order="C", copy=True))
  return sd


class TorchRunner:
  """The KD step as a PyTorch user writes it (eager transformers models, torch AdamW)."""

  def __init__(self, args, autocast_bf16: bool, init_params=None):
    import torch
    import transformers
    from ddk_jax.hf.hf_config import hf_config_from_model_config
    self.torch = torch
    self.device = torch.device(args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher_cfg, student_cfg = model_configs(args, "float32")

    def build(cfg, params):
      d = hf_config_from_model_config(cfg, dtype="float32")
      d = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
      d["use_cache"] = False
      hf_cfg = transformers.LlamaConfig(**d)
      hf_cfg._attn_implementation = args.torch_attn
      torch.manual_seed(0)
      model = transformers.LlamaForCausalLM(hf_cfg)
      if params is not None:
        model.load_state_dict(torch_state_dict(params, cfg), strict=True)
      return model.to(self.device, torch.float32)

    init_s, init_t = init_params if init_params is not None else (None, None)
    self.teacher = build(teacher_cfg, init_t).eval().requires_grad_(False)
    self.student = build(student_cfg, init_s).train()
    no_decay = [p for n, p in self.student.named_parameters() if n.endswith("norm.weight")]
    decay = [p for n, p in self.student.named_parameters() if not n.endswith("norm.weight")]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    batch = make_batch(args, 4)
    self.inputs = torch.from_numpy(batch["inputs"]).long().to(self.device)
    self.targets = torch.from_numpy(batch["targets"]).long().to(self.device)
    self.autocast = autocast_bf16
    self.gamma, self.t = args.gamma, args.temperature
    self.first_loss = None

  def _loss(self):
    F = self.torch.nn.functional
    with self.torch.no_grad():
      t_logits = self.teacher(input_ids=self.inputs).logits
    s_logits = self.student(input_ids=self.inputs).logits
    v = s_logits.shape[-1]
    ce = F.cross_entropy(s_logits.reshape(-1, v).float(), self.targets.reshape(-1))
    t = self.t
    kl = F.kl_div(F.log_softmax(s_logits.reshape(-1, v).float() / t, dim=-1),
                  F.log_softmax(t_logits.reshape(-1, v).float() / t, dim=-1),
                  reduction="batchmean", log_target=True) * (t * t)
    return ce + self.gamma * kl

  def step(self) -> float:
    torch = self.torch
    t0 = time.perf_counter()
    if self.autocast:
      with torch.autocast(self.device.type, dtype=torch.bfloat16):
        loss = self._loss()
    else:
      loss = self._loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    value = float(loss.detach())  # synchronises (also on CUDA)
    dt = time.perf_counter() - t0
    if self.first_loss is None:
      self.first_loss = value
    return dt


def model_shaped_matmul_flops(args, dtype: str) -> float:
  """FLOP/s of the teacher's layer matmuls alone (q, k, v, o, gate, up, down for every
  layer, [batch*seq, hidden] activations, fp32 accumulation), jitted back to back: what
  the matmul library reaches at the shapes this step actually has, as opposed to the
  square-matmul peak MFU divides by. No attention, norms or loss: an upper bound."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  layers, hidden, heads, kv, hd, inter = args.shapes["teacher"]
  dt = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  mk = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 0.02, dt)
  x = mk(args.batch * args.seq, hidden)
  w = dict(q=mk(hidden, heads * hd), k=mk(hidden, kv * hd), v=mk(hidden, kv * hd), o=mk(heads * hd, hidden),
           gate=mk(hidden, inter), up=mk(hidden, inter), down=mk(inter, hidden))
  mm = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dt)

  @jax.jit
  def chain(x, w):
    for _ in range(layers):
      q, k, v = mm(x, w["q"]), mm(x, w["k"]), mm(x, w["v"])
      x = x + mm(q + jnp.tile(k + v, (1, heads // kv)), w["o"])
      x = x + mm(mm(x, w["gate"]) * mm(x, w["up"]), w["down"])
    return x

  tokens = args.batch * args.seq
  flop = layers * 2 * tokens * (hidden * (heads + 2 * kv) * hd + heads * hd * hidden + 3 * hidden * inter)
  jax.block_until_ready(chain(x, w))
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(chain(x, w))
    best = min(best, time.perf_counter() - t)
  return flop / best


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  import jax
  from ddk_jax import flops
  from ddk_jax.model import resolve_compute_dtype

  platform_name = jax.devices()[0].platform
  on_cpu = platform_name == "cpu"
  compute = {impl: resolve_compute_dtype(COMPUTE[impl], platform_name) for impl in args.impls}
  if any(i.startswith("torch") for i in args.impls):
    import torch
    if on_cpu:
      torch.set_num_threads(os.cpu_count())
  teacher_cfg, student_cfg = model_configs(args, "bfloat16")
  tokens = args.batch * args.seq
  step_flops = flops.kd_step_flops(student_cfg, teacher_cfg, tokens, args.seq)

  threads = f", torch threads {torch.get_num_threads()}" if any(i.startswith("torch") for i in args.impls) else ""
  print(f"machine: {_cpu_model()}, {os.cpu_count()} cores{threads}; JAX {jax.__version__} on "
        f"{jax.devices()[0].device_kind}")
  for who, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
    print(f"{who}: {cfg.num_layers} layers x {cfg.hidden_size} hidden, {cfg.num_heads} heads / {cfg.num_kv_heads} kv "
          f"x {cfg.resolved_head_dim}, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
          f"{cfg.num_params() / 1e6:.1f}M params")
  print(f"batch {args.batch} x seq {args.seq} = {tokens} tokens/step, model FLOPs/step {step_flops / 1e9:.1f} G, "
        f"loss {args.loss_impl}, remat {args.remat}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

  runners = {}
  host_init = None
  for impl in args.impls:
    t0 = time.perf_counter()
    if impl.startswith("jax"):
      runners[impl] = JaxRunner(args, COMPUTE[impl], init_params=host_init)
      if host_init is None and args.same_init:
        host_init = runners[impl].initial_params_host()
    else:
      if host_init is None and args.same_init:
        host_init = JaxRunner(args, "float32").initial_params_host()
      runners[impl] = TorchRunner(args, autocast_bf16=(impl == "torch_bf16"),
                                  init_params=host_init if args.same_init else None)
    for _ in range(args.warmup):
      runners[impl].step()
    print(f"  {impl}: set up and {args.warmup} warm-up steps in {time.perf_counter() - t0:.1f} s")

  peaks = {"float32": [], "bfloat16": []}
  peak_n = 1024 if on_cpu else 8192

  shaped = {"float32": [], "bfloat16": []}

  def measure_peaks():
    for dt in peaks:
      peaks[dt].append(flops.time_matmul_peak(dt, n=peak_n, repeats=3))
      if on_cpu:
        shaped[dt].append(model_shaped_matmul_flops(args, dt))

  times = {impl: [] for impl in args.impls}
  order = list(args.impls)
  for r in range(args.rounds):
    measure_peaks()
    for impl in order:
      for _ in range(args.steps):
        times[impl].append(runners[impl].step())
    order = order[1:] + order[:1]
  measure_peaks()

  peak = {dt: max(v) for dt, v in peaks.items()}
  if not on_cpu:
    peak["bfloat16"] = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops_per_device("bfloat16")[0]

  rows = []
  for impl in args.impls:
    med = statistics.median(times[impl])
    label = LABELS[impl][1] + (f" = {_short(compute[impl])}" if COMPUTE[impl] == "auto" else "")
    rows.append(dict(impl=impl, name=LABELS[impl][0], dtype=label, step_ms=med * 1e3,
                     min_ms=min(times[impl]) * 1e3, tokens_per_s=tokens / med,
                     mfu=step_flops / med / peak[compute[impl]], peak_dtype=compute[impl],
                     first_loss=runners[impl].first_loss))
  by = {r["impl"]: r for r in rows}

  print()
  print(f"matmul peak (best of {len(peaks['float32'])} measurements): f32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 x bf16 -> f32 {peak['bfloat16'] / 1e9:.0f} GFLOP/s")
  shaped_best = {dt: max(v) for dt, v in shaped.items() if v}
  if shaped_best:
    bound = {dt: tokens * shaped_best[dt] / step_flops for dt in shaped_best}
    print(f"matmuls alone at the teacher's layer shapes: f32 {shaped_best['float32'] / 1e9:.0f} GFLOP/s "
          f"({100 * shaped_best['float32'] / peak['float32']:.0f}% of peak), bf16 "
          f"{shaped_best['bfloat16'] / 1e9:.0f} GFLOP/s; a step made of nothing but such matmuls would run "
          f"{bound['float32']:.0f} tokens/s in f32, {bound['bfloat16']:.0f} in bf16")
  head = f"| {'impl':<12} | {'dtype':<18} | {'tokens/s':>8} | {'step ms':>8} | {'min ms':>7} | {'MFU':>5} |"
  ratio_cols = [c for c in ("torch_fp32", "torch_bf16") if c in by]
  for c in ratio_cols:
    head += f" {'vs ' + LABELS[c][1].replace('fp32', 'torch fp32').replace('bf16 autocast', 'torch bf16'):>13} |"
  head += " first loss |"
  print(head)
  print("|" + "|".join("-" * (len(x)) for x in head.split("|")[1:-1]) + "|")
  for r in rows:
    line = (f"| {r['name']:<12} | {r['dtype']:<18} | {r['tokens_per_s']:>8.0f} | {r['step_ms']:>8.1f} | "
            f"{r['min_ms']:>7.1f} | {100 * r['mfu']:>4.1f}% |")
    for c in ratio_cols:
      r[f"vs_{c}"] = r["tokens_per_s"] / by[c]["tokens_per_s"]
      line += f" {r[f'vs_{c}']:>12.2f}x |"
    line += f" {r['first_loss']:>10.4f} |"
    print(line)
  print("MFU: model FLOPs / (median step time x matmul peak of the dtype the matmuls run in: "
        f"{'f32' if on_cpu else 'measured f32'} for fp32 rows, bf16 for bf16 rows).")
  # The same ratios from step times taken close together (median over rounds of the ratio of
  # the round's medians): less sensitive to load that changes during the run.
  for c in ratio_cols:
    paired = {}
    for impl in args.impls:
      per_round = [statistics.median(times[c][i:i + args.steps]) / statistics.median(times[impl][i:i + args.steps])
                   for i in range(0, len(times[impl]), args.steps)]
      paired[impl] = statistics.median(per_round)
      by[impl][f"paired_vs_{c}"] = paired[impl]
    print(f"paired per-round speed-up vs {c}: " + ", ".join(f"{k} {v:.2f}x" for k, v in paired.items()))
  if on_cpu:
    # MFU per round against the peak measured right before and after that round (the better
    # of the two), median over rounds: the cores' speed drifts on a shared machine, and the
    # run's single best peak sample can come from a fast moment no step saw.
    for impl in args.impls:
      samples = peaks[compute[impl]]
      per_round = [step_flops / statistics.median(times[impl][i * args.steps:(i + 1) * args.steps])
                   / max(samples[i], samples[i + 1]) for i in range(args.rounds)]
      by[impl]["paired_mfu"] = statistics.median(per_round)
    print("paired per-round MFU (peak measured next to the round): "
          + ", ".join(f"{impl} {100 * by[impl]['paired_mfu']:.1f}%" for impl in args.impls))

  result = dict(machine=dict(processor=_cpu_model(), cores=os.cpu_count(), device=jax.devices()[0].device_kind),
                args={k: v for k, v in vars(args).items() if k != "shapes"}, shapes=args.shapes,
                model_flops_per_step=step_flops, tokens_per_step=tokens,
                peaks_flops={k: v for k, v in peak.items()}, peak_samples=peaks, rows=rows,
                model_shaped_matmul_flops=shaped,
                step_times_s=times)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


def _short(dtype: str) -> str:
  return {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == "__main__":
  main()
