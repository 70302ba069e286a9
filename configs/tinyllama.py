"""The paper's LLaMA pair: Llama-2-13B (teacher) distilled into TinyLlama-1.1B with DDK.

    python -m ddk_jax.main --config=configs/tinyllama.py --workdir=/ckpt/ddk_tinyllama \
        --config.teacher.path=/models/Llama-2-13b-hf \
        --config.student.path=/models/TinyLlama_v1.1 \
        --config.data.prepared_dir=/data/ddk_redpajama_prepared

Both checkpoints are local (or gs://) Hugging Face directories with safetensors; their
config.json defines the shapes (the `model` sections below record them and set how to run
them). Data: RedPajama's seven domains as in the paper, each a glob of .jsonl(.gz) files
under $DDK_DATA (default /data/redpajama) with a `text` field; 500 documents per domain
are held out for validation. Tokenize once with
`python -m ddk_jax.data.prepare --config=configs/tinyllama.py` (training also does it).
"""

import os

from ddk_jax.config_defaults import base_config, model_section

DATA = os.environ.get("DDK_DATA", "/data/redpajama")
REDPAJAMA_DOMAINS = ("common_crawl", "c4", "github", "wikipedia", "book", "arxiv", "stackexchange")


def get_config():
  c = base_config()
  c.mode = "ddk"
  c.steps = 30_000
  c.global_batch_size = 256  # x 2048 tokens = 0.5M tokens per step

  c.teacher.source = "hf"
  c.teacher.path = ""  # --config.teacher.path=/models/Llama-2-13b-hf
  c.teacher.model = model_section(
      vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
      num_kv_heads=40, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
      param_dtype="bfloat16", compute_dtype="bfloat16", remat="none")
  c.student.source = "hf"
  c.student.path = ""  # --config.student.path=/models/TinyLlama_v1.1
  c.student.model = model_section(
      vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
      num_kv_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
      param_dtype="float32", compute_dtype="bfloat16", remat="dots")

  c.data.domains = [{"name": d, "train": [os.path.join(DATA, d, "*.jsonl*")], "validation": [],
                     "text_field": "text", "weight": 1.0} for d in REDPAJAMA_DOMAINS]
  c.data.tokenizer = ""  # defaults to the student's directory (set below by the flag value)
  c.data.seq_len = 2048
  c.data.num_validation_docs = 500  # the paper: 500 validation samples per domain
  c.data.prepared_dir = os.path.join(DATA, "prepared_llama2")

  # FSDP over every device; switch to tensor parallelism for very large teachers.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 1.0

  c.loss.gamma = 1.0
  c.loss.temperature = 1.0
  c.ddk.interval = 1000  # the paper's distillation interval K
  c.ddk.alpha = 0.5  # factor-smoothing weight
  c.ddk.eval_batch_size = 64

  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  c.checkpoint.keep_period = 5000
  c.logging.every = 10
  return c
