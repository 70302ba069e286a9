"""The base experiment config every `configs/*.py` starts from.

Each config file calls `base_config()`, overrides what its experiment needs and returns
it.  The base is locked: a key that does not exist here is an error (a typo never turns
into a silently ignored setting).  Every key is documented in docs/config.md.
"""

from __future__ import annotations

import ml_collections

from ddk_jax.model import ModelConfig


def model_section(**overrides) -> ml_collections.ConfigDict:
  d = ModelConfig().to_dict()
  d.update(overrides)
  cfg = ml_collections.ConfigDict(d)
  # rope_scaling is None or a dict; let configs and flags set either.
  cfg.rope_scaling = ml_collections.FieldReference(d["rope_scaling"], field_type=object)
  return cfg


def config_from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of another experiment file, e.g. a preset that starts from
  configs/tinyllama.py: `config_from_file(os.path.join(os.path.dirname(__file__), "tinyllama.py"))`."""
  import importlib.util
  import os
  name = "ddk_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  from ddk_jax.data.config import default_data_config  # the data package owns its section

  c = ml_collections.ConfigDict()
  c.mode = "ddk"  # cpt | kd | ddk | ddk_no_smoothing | ddk_equal_sampling
  c.seed = 0
  c.steps = 1000
  c.global_batch_size = 8  # sequences per optimizer step, over all hosts
  # Persistent XLA compilation cache (the CLI turns it on): a restarted or resumed run, and
  # a phase whose step another phase already compiled, loads executables instead of
  # compiling again. Local path or gs://; "" turns it off.
  c.compilation_cache_dir = "~/.cache/ddk_jax/xla"

  # Models. source: 'random' (initialised here), 'hf' (a local or gs:// Hugging Face
  # directory in `path`; its config.json defines the shape), 'workdir' (the student of a
  # finished ddk_jax run in `path`, e.g. the demo's pre-trained teacher).
  c.teacher = ml_collections.ConfigDict()
  c.teacher.source = "random"
  c.teacher.path = ""
  # compute_dtype 'auto': bf16 matmuls (fp32 accumulation) on GPU/TPU, fp32 on CPU, where
  # it is the faster choice (docs/performance.md). The teacher is stored in bf16 everywhere.
  c.teacher.model = model_section(param_dtype="bfloat16", compute_dtype="auto")
  # source='workdir' with pretrain_steps > 0: first pre-train this model from scratch
  # (mode cpt, this run's data) into `path` (relative: inside the workdir). The demo uses it.
  c.teacher.pretrain_steps = 0
  c.teacher.pretrain_learning_rate = 1e-3
  # Offline teacher (docs/teacher_cache.md): `python -m ddk_jax.teacher_cache` runs the teacher once over
  # the training rows into cache_dir; training with source='cache' reads it and never loads the teacher.
  c.teacher.cache_dir = ""
  c.teacher.cache_top_k = 64  # teacher log-probabilities kept per token (plus one bucket for the rest)
  c.teacher.cache_dtype = "float16"  # float16 | bfloat16 | float32: storage of the log-probabilities
  # Rows cached per domain, as a share of the run's steps * global_batch_size: 1.0 covers any mixture.
  c.teacher.cache_domain_share = 1.0
  c.teacher.cache_rows_per_shard = 0  # rows per ArrayRecord shard; 0: about 128 MiB per shard
  c.student = ml_collections.ConfigDict()
  c.student.source = "random"
  c.student.path = ""
  c.student.model = model_section(compute_dtype="auto")  # fp32 params (and optimizer state)
  c.student.pretrain_steps = 0
  c.student.pretrain_learning_rate = 1e-3

  c.data = default_data_config()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # [[logical_axis, mesh_axis or [mesh_axes] or None], ...]; empty: ddk_jax.sharding.DEFAULT_RULES
  c.mesh.rules = ml_collections.FieldReference([], field_type=list)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"  # cosine | constant
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.grad_accum = 1
  # A step with a non-finite loss or gradient is skipped (params and optimizer state kept);
  # after this many in a row the run stops, keeping its last good checkpoint (0: never stop).
  c.optimizer.max_consecutive_skips = 10

  c.loss = ml_collections.ConfigDict()
  c.loss.gamma = 1.0  # weight of the KD term
  c.loss.temperature = 1.0
  c.loss.impl = "chunked"  # chunked | naive (reference, materialises full logits)
  c.loss.chunk_size = 0  # tokens per chunk of the chunked loss; 0 = chosen from the vocab
  # D(P || Q) of the KD term, P = teacher, Q = student (docs/loss.md): forward_kl | reverse_kl |
  # jsd | tvd | skew_forward_kl | skew_reverse_kl | akl
  c.loss.divergence = "forward_kl"
  c.loss.jsd_beta = 0.5  # jsd: M = beta P + (1 - beta) Q, in (0, 1); 0.5 is the Jensen-Shannon divergence
  c.loss.skew_alpha = 0.1  # skew_*: KL(P || a P + (1-a) Q) / KL(Q || a Q + (1-a) P), in [0, 1)
  c.loss.akl_mu = 0.5  # akl: cumulative teacher probability that ends the head, in [0, 1]
  # Schedules over the run's `steps`: constant | linear | cosine, from gamma / temperature
  # at step 0 to gamma_end / temperature_end at `steps` (an end value is needed unless constant).
  c.loss.gamma_schedule = "constant"
  c.loss.gamma_end = ml_collections.FieldReference(None, field_type=float)
  c.loss.temperature_schedule = "constant"
  c.loss.temperature_end = ml_collections.FieldReference(None, field_type=float)

  c.ddk = ml_collections.ConfigDict()
  c.ddk.interval = 1000  # K: steps between domain-weight updates
  c.ddk.alpha = 0.5  # factor-smoothing weight
  # Minimum / maximum weight per domain: a number for every domain, or {domain: number}
  # (domains left out: no floor / no cap). sum(floor) <= 1 <= sum(cap).
  c.ddk.floor = ml_collections.FieldReference(0.0, field_type=object)
  c.ddk.cap = ml_collections.FieldReference(1.0, field_type=object)
  c.ddk.discrepancy = "ratio"  # x = lS / lT (the paper) | excess: x = lS - lT
  c.ddk.softmax_temperature = 1.0  # tau of softmax(x / tau); 1 in the paper
  # Where lS and lT come from: validation (held-out rows every K steps, the paper) | train
  # (the training batches' own losses over the last K steps: no validation for the controller).
  c.ddk.signal = "validation"
  c.ddk.signal_ema = 1.0  # train signal: weight of the newest interval in a running mean (1: that interval only)
  c.ddk.update_at_start = True  # first update at step 0 from the measured gap
  # The static mixture of kd/cpt (and ddk before its first update) is data.domains[i].weight.
  c.ddk.eval_batch_size = 8  # validation rows per eval batch (global)
  # Validation rows (of data.seq_len tokens) per domain the student and teacher are scored
  # on, over all hosts; 0: the whole validation split. The same rows at every update.
  c.ddk.eval_max_rows = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # extra student validation every N steps (0: only at DDK updates and the end)
  # Downstream tasks on the student (lm-eval through ddk_jax.downstream; needs the eval extra):
  # comma-separated names ("ddk_local", "ddk_math,arc_easy", ...); "" (default): none.
  c.eval.tasks = ""
  c.eval.tasks_every = 0  # also every N steps (0: only at the end)
  c.eval.tasks_limit = 0  # documents per task (0: all)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  c.checkpoint.keep_period = 0  # also keep every M-th step's checkpoint (0: off)
  c.checkpoint.async_save = True

  c.logging = ml_collections.ConfigDict()
  c.logging.every = 10
  c.logging.tensorboard = True
  c.logging.progress_bar = True

  c.lock()
  return c
