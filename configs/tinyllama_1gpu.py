"""The paper's LLaMA pair (Llama-2-13B -> TinyLlama-1.1B, configs/tinyllama.py) on one 80 GB H100.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m ddk_jax.main --config=configs/tinyllama_1gpu.py \
        --workdir=/ckpt/ddk_tinyllama_1gpu \
        --config.teacher.path=/models/Llama-2-13b-hf --config.student.path=/models/TinyLlama_v1.1

Same experiment as configs/tinyllama.py (global batch 256 x 2048 tokens, the paper's
schedule and DDK settings); only how a step is laid out on the device differs. Sized with
`python -m ddk_jax.memory_estimate --config=configs/tinyllama_1gpu.py --device_memory_gib=79.6`
(table and reasoning in docs/gpu.md): about 54 GiB per step at its peak, of which 40.6
GiB is resident (student fp32 params, AdamW moments and grad accumulator 16.4 GiB,
bf16 teacher 24.2 GiB).
"""

import os

from ddk_jax.config_defaults import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyllama.py"))
  c.mesh.data = 1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # 256 rows per step as 64 micro-batches of 4 rows (8k tokens): with 8 rows the peak
  # would be ~63 GiB, over the 60 GiB JAX takes by default (75% of the card).
  c.optimizer.grad_accum = 64
  c.student.model.param_dtype = "float32"  # fp32 master weights and AdamW moments
  c.student.model.compute_dtype = "bfloat16"
  # Only the layer inputs are kept for the backward (0.7 GiB at 4 rows); without remat
  # the XLA attention alone would keep 22 layers x 32 heads x 2048^2 scores per row.
  c.student.model.remat = "full"
  c.teacher.model.param_dtype = "bfloat16"
  c.teacher.model.compute_dtype = "bfloat16"
  # The controller's eval step scores 8 rows at a time: the teacher's forward over them
  # needs ~16 GiB next to the resident state (64 rows, the base value, would not fit).
  c.ddk.eval_batch_size = 8
  c.loss.chunk_size = 0  # default for V=32000: 1024 tokens per chunk, 5 x 125 MiB fp32 blocks
  return c
