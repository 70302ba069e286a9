"""The paper's Qwen pair: Qwen1.5-14B (teacher) distilled into Qwen1.5-1.8B with DDK.

    python -m ddk_jax.main --config=configs/qwen1_5.py --workdir=/ckpt/ddk_qwen \
        --config.teacher.path=/models/Qwen1.5-14B --config.student.path=/models/Qwen1.5-1.8B

Ten domains as in the paper: RedPajama's seven plus OpenWebMath, Chinese CommonCrawl and
Chinese Books, each a glob of .jsonl(.gz) files under $DDK_DATA (default /data/ddk).
The 14B checkpoint pads its vocab to 152064 and the 1.8B to 151936 with one shared
tokenizer; the KD loss uses the teacher logits of the student's ids.
"""

import os

from ddk_jax.config_defaults import base_config, model_section

DATA = os.environ.get("DDK_DATA", "/data/ddk")
DOMAINS = ("common_crawl", "c4", "github", "wikipedia", "book", "arxiv", "stackexchange",
           "open_web_math", "chinese_common_crawl", "chinese_books")


def get_config():
  c = base_config()
  c.mode = "ddk"
  c.steps = 30_000
  c.global_batch_size = 256

  c.teacher.source = "hf"
  c.teacher.path = ""
  c.teacher.model = model_section(
      vocab_size=152064, hidden_size=5120, intermediate_size=13696, num_layers=40, num_heads=40,
      num_kv_heads=40, attention_bias=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
      max_position_embeddings=32768, param_dtype="bfloat16", compute_dtype="bfloat16")
  c.student.source = "hf"
  c.student.path = ""
  c.student.model = model_section(
      vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_layers=24, num_heads=16,
      num_kv_heads=16, attention_bias=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
      tie_word_embeddings=False, max_position_embeddings=32768, param_dtype="float32",
      compute_dtype="bfloat16", remat="dots")

  c.data.domains = [{"name": d, "train": [os.path.join(DATA, d, "*.jsonl*")], "validation": [],
                     "text_field": "text", "weight": 1.0} for d in DOMAINS]
  c.data.seq_len = 2048
  c.data.num_validation_docs = 500
  c.data.prepared_dir = os.path.join(DATA, "prepared_qwen1_5")

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 0.1

  c.loss.gamma = 1.0
  c.loss.temperature = 1.0
  c.ddk.interval = 1000
  c.ddk.alpha = 0.5
  c.ddk.eval_batch_size = 64

  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  c.checkpoint.keep_period = 5000
  return c
