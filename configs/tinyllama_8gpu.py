"""The paper's LLaMA pair (Llama-2-13B -> TinyLlama-1.1B, configs/tinyllama.py) on 8 x 80 GB H100.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m ddk_jax.main --config=configs/tinyllama_8gpu.py \
        --workdir=/ckpt/ddk_tinyllama_8gpu \
        --config.teacher.path=/models/Llama-2-13b-hf --config.student.path=/models/TinyLlama_v1.1

One host, 8 GPUs, one process (no distributed initialisation needed). Same experiment as
configs/tinyllama.py; only the layout differs. Sized with
`python -m ddk_jax.memory_estimate --config=configs/tinyllama_8gpu.py --device_memory_gib=79.6`
(table in docs/gpu.md): about 43 GiB per GPU at the peak.
"""

import os

from ddk_jax.config_defaults import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyllama.py"))
  # FSDP over the 8 GPUs: each holds 1/8 of the student's params, grads and moments and
  # of the teacher (5.1 GiB resident per GPU instead of 40.6).
  c.mesh.data = 1
  c.mesh.fsdp = 8
  c.mesh.tensor = 1
  # 256 rows = 2 micro-batches x 8 GPUs x 16 rows (32k tokens per GPU per micro-batch).
  # One micro-batch of 32 rows per GPU would peak at ~78 GiB: no room left.
  c.optimizer.grad_accum = 2
  c.student.model.param_dtype = "float32"
  c.student.model.compute_dtype = "bfloat16"
  c.student.model.remat = "full"
  c.teacher.model.param_dtype = "bfloat16"
  c.teacher.model.compute_dtype = "bfloat16"
  c.ddk.eval_batch_size = 64  # 8 rows per GPU
  # A chunk of the loss spans the whole micro-batch (128 rows); 8192 tokens = 1024 per
  # GPU keeps the head matmuls large (the default, 1024, would leave 128 per GPU).
  c.loss.chunk_size = 8192
  return c
