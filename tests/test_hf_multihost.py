"""Two local processes (gloo CPU collectives): import onto a mesh spanning both hosts,
each host reading only its own shards, then export (gather + process-0 write).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ddk_jax.hf import export_hf_checkpoint
from ddk_jax.hf.hf_import import iter_hf_tensors
from ddk_jax.model import ModelConfig, param_shapes_and_axes

REPO = Path(__file__).resolve().parents[1]

_WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    pid, port, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from ddk_jax import sharding
    from ddk_jax.hf import export_hf_checkpoint, load_hf_checkpoint
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    params, cfg = load_hf_checkpoint(src, mesh=mesh, param_dtype="float32")
    wq = params["layers"]["wq"]
    assert not wq.is_fully_addressable and len(wq.addressable_shards) == 2
    export_hf_checkpoint(params, cfg, out, dtype="float32", max_shard_size_bytes=60_000)
    print("DONE", pid, flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_import_export_roundtrip(tmp_path):
  cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, attention_bias=True)
  rng = np.random.default_rng(0)
  shapes, _ = param_shapes_and_axes(cfg)
  import jax
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s).astype(np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  src = tmp_path / "src"
  export_hf_checkpoint(params, cfg, src, architecture="Qwen2ForCausalLM", dtype="float32")
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), port, str(src), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  deadline = time.monotonic() + 150
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  except subprocess.TimeoutExpired:
    pytest.fail("two-process HF import/export hung (> 150 s)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, text in zip(procs, outs):
    assert p.returncode == 0, text
  assert (out / "model.safetensors.index.json").exists()
  assert sorted(n.name for n in tmp_path.iterdir()) == ["out", "src"]  # no staging leftovers
  original, exported = dict(iter_hf_tensors(src)), dict(iter_hf_tensors(out))
  assert sorted(original) == sorted(exported)
  for name, x in original.items():
    np.testing.assert_array_equal(x, exported[name], err_msg=name)
