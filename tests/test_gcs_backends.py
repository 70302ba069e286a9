"""The libraries a gs:// run directory goes through, against the local GCS emulator:
orbax checkpoints (tensorstore's gcs driver + etils.epath/gcsfs for directories), Hugging
Face safetensors read through etils.epath, jsonl/parquet data sources, TensorBoard event
files (tensorboardX's own gs:// writer, and a storage.LocalMirror) and matplotlib plots."""

from __future__ import annotations

import gzip
import json
import os
import struct
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddk_jax import checkpointing, storage
from ddk_jax.data import sources as S
from ddk_jax.data.config import DataConfigError, DomainSpec
from ddk_jax.hf import export_hf_checkpoint, load_hf_checkpoint, open_checkpoint, validate_checkpoint_dir
from ddk_jax.model import ModelConfig, param_shapes_and_axes

MARKER = "commit_success.txt"


# ---- orbax ---------------------------------------------------------------------------------


def _state(step: int):
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  w = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8) + step, NamedSharding(mesh, P("data", "model")))
  b = jax.device_put(np.full((8,), step, np.float32), NamedSharding(mesh, P("model")))
  return {"params": {"w": w, "b": b}, "step": jax.numpy.int32(step)}


def _data_iterator(position: int):
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  for _ in range(position):
    next(it)
  return it


def _save(manager, step):
  """The items of a ddk_jax checkpoint step: sharded state, grain iterator state, JSON meta."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(step)),
      data=grain.checkpoint.CheckpointSave(_data_iterator(10 * step)),
      meta=ocp.args.JsonSave({"step": step, "note": "ü"})))


@pytest.mark.devices(8)
def test_orbax_manager_saves_and_restores_a_sharded_tree_on_gcs(gcs_dir):
  directory = checkpointing.checkpoint_dir(f"{gcs_dir}/run")
  assert directory == f"{gcs_dir}/run/checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, cleanup_tmp_directories=True,
                                         enable_async_checkpointing=True)
  with ocp.CheckpointManager(directory, options=options) as manager:
    for step in (1, 2, 3):
      assert _save(manager, step)
    manager.wait_until_finished()
    assert list(manager.all_steps()) == [2, 3]
  # On GCS there is no rename: each step is written in place and committed by the marker.
  assert storage.listdir(directory) == ["2", "3"]
  for step in (2, 3):
    assert storage.listdir(f"{directory}/{step}") == ["_CHECKPOINT_METADATA", MARKER, "data", "meta", "state"]
  assert checkpointing.scan_steps(directory) == ([2, 3], [])

  reader = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  assert reader.latest_step() == 3
  want = _state(3)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), want)
  data = _data_iterator(0)
  got = reader.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                  data=grain.checkpoint.CheckpointRestore(data),
                                                  meta=ocp.args.JsonRestore()))
  reader.close()
  assert got["meta"] == {"step": 3, "note": "ü"}
  assert next(data) == 30
  for a, b in zip(jax.tree.leaves(got["state"]), jax.tree.leaves(want)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.devices(8)
def test_orbax_on_gcs_deletes_every_uncommitted_directory_in_its_root(gcs_dir):
  """What an owner manager (cleanup_tmp_directories=True) does at start on GCS: any directory
  of the checkpoints root without commit_success.txt counts as an unfinished save and is
  deleted, whatever its name; a reader manager leaves them."""
  directory = f"{gcs_dir}/run/checkpoints"
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True)) as manager:
    _save(manager, 1)
  for name in ("2", "2.unusable-20260101T000000"):
    storage.write_text(f"{directory}/{name}/state/_METADATA", "{}")
  ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)).close()
  assert storage.listdir(directory) == ["1", "2", "2.unusable-20260101T000000"]
  assert checkpointing.scan_steps(directory)[0] == [1]
  owner = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(cleanup_tmp_directories=True))
  # The cleanup runs in a background thread that close() does not wait for (the next save
  # does), so the directory is polled until it has finished.
  deadline = time.monotonic() + 60
  while storage.listdir(directory) != ["1"] and time.monotonic() < deadline:
    time.sleep(0.2)
  owner.close()
  assert storage.listdir(directory) == ["1"]


# ---- Hugging Face checkpoints --------------------------------------------------------------

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def hf_params():
  rng = np.random.default_rng(0)
  shapes, _ = param_shapes_and_axes(CFG)
  return jax.tree.map(lambda s: rng.normal(0, 0.05, s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 100_000], ids=["single-file", "sharded"])
def test_hf_checkpoint_is_read_from_gcs(hf_params, tmp_path, gcs_dir, shard_bytes):
  local = export_hf_checkpoint(hf_params, CFG, str(tmp_path / "hf"), dtype="float32",
                               max_shard_size_bytes=shard_bytes)
  remote = f"{gcs_dir}/models/tiny"
  storage.upload_dir(local, remote)
  assert validate_checkpoint_dir(remote) == CFG
  ckpt = open_checkpoint(remote)
  assert ckpt.files == open_checkpoint(local).files
  assert (len(ckpt.files) > 1) == (shard_bytes < 2**20)
  params, cfg = load_hf_checkpoint(remote, param_dtype="float32")
  assert cfg == CFG
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, hf_params)


def test_hf_export_writes_to_gcs(hf_params, gcs_dir):
  out = export_hf_checkpoint(hf_params, CFG, f"{gcs_dir}/exported", dtype="float32", max_shard_size_bytes=100_000)
  assert validate_checkpoint_dir(out) == CFG
  assert "config.json" in storage.listdir(out) and "model.safetensors.index.json" in storage.listdir(out)


# ---- data sources --------------------------------------------------------------------------


def _spec(train, **kw):
  return DomainSpec(name="web", domain_id=0, train=tuple(train), validation=(), text_field="text", weight=1.0,
                    txt_split="file", array_record_format="text", num_validation_docs=2, **kw)


def test_jsonl_and_parquet_sources_are_read_from_gcs(tmp_path, gcs_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq

  data = f"{gcs_dir}/data"
  storage.write_text(f"{data}/a.jsonl", '{"text": "a1"}\n\n{"text": "a2 ü"}\n')
  storage.write_bytes(f"{data}/b.jsonl.gz", gzip.compress(b'{"text": "b1"}\n'))
  pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "c.parquet")
  storage.upload_file(str(tmp_path / "c.parquet"), f"{data}/c.parquet")

  spec = _spec([f"{data}/*.jsonl*", f"{data}/a.jsonl", f"{data}/c.parquet"])
  opts = S.ReadOptions(domain="web", split="train")
  sources = S.resolve_sources(spec, "train")
  assert [(s.kind, s.path) for s in sources] == [
      ("jsonl", f"{data}/a.jsonl"), ("jsonl.gz", f"{data}/b.jsonl.gz"), ("parquet", f"{data}/c.parquet")]
  assert [S.count_documents(s, opts) for s in sources] == [2, 1, 3]
  assert list(S.iter_split_documents(sources, opts)) == ["a1", "a2 ü", "b1", "p1", "p2", "p3"]
  assert S.source_fingerprint(sources[0]) == {"path": f"{data}/a.jsonl",
                                              "size": storage.getsize(f"{data}/a.jsonl")}
  with pytest.raises(DataConfigError, match="no such file"):
    S.resolve_sources(_spec([f"{data}/missing.jsonl"]), "train")
  with pytest.raises(DataConfigError, match="matched no files"):
    S.resolve_sources(_spec([f"{data}/*.txt"]), "train")


def test_prepared_dir_on_gcs_fails_early_with_the_fix():
  from ddk_jax.data import prepare
  with pytest.raises(DataConfigError, match="gcsfuse"):
    prepare.load_manifest("gs://bucket/prepared")


# ---- TensorBoard and plots -----------------------------------------------------------------


def _scalar_steps(event_file_bytes: bytes) -> list[int]:
  from tensorboardX.proto import event_pb2
  steps, off = [], 0
  while off < len(event_file_bytes):
    (n,) = struct.unpack("Q", event_file_bytes[off:off + 8])
    event = event_pb2.Event()
    event.ParseFromString(event_file_bytes[off + 12:off + 12 + n])
    off += 12 + n + 4
    if event.summary.value:
      steps.append(event.step)
  return steps


def test_tensorboardx_writes_event_files_to_gcs(gcs_dir):
  from tensorboardX import SummaryWriter

  direct = f"{gcs_dir}/run/tensorboard"
  writer = SummaryWriter(direct)  # tensorboardX's own gs:// writer (google-cloud-storage)
  gcs_record_writer = writer._get_file_writer().event_writer._ev_writer._py_recordio_writer._writer
  for step in range(3):
    writer.add_scalar("train/loss", 1.0 / (step + 1), step)
  writer.flush()
  writer.add_scalar("train/loss", 0.1, 3)
  writer.close()
  # tensorboardX keeps every writer alive until exit (atexit), and its gs:// record writer
  # uploads the whole file again when it is finally collected -- after this emulator is gone,
  # that retries for 120 s.  (Why a run writes its events through a LocalMirror instead.)
  gcs_record_writer.flush = lambda: None
  (name,) = storage.listdir(direct)
  assert name.startswith("events.out.tfevents.")
  assert _scalar_steps(storage.read_bytes(f"{direct}/{name}")) == [0, 1, 2, 3]

  mirrored = f"{gcs_dir}/run2/tensorboard"
  with storage.LocalMirror(mirrored) as mirror:  # events written locally, uploaded on sync/close
    writer = SummaryWriter(mirror.local)
    writer.add_scalar("train/loss", 0.5, 7)
    writer.close()
  (name,) = storage.listdir(mirrored)
  assert _scalar_steps(storage.read_bytes(f"{mirrored}/{name}")) == [7]


def test_matplotlib_saves_a_plot_to_gcs(gcs_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(2, 2))
  ax.plot([0, 1], [1, 0])
  with storage.open(f"{gcs_dir}/run/domain_weights.png", "wb") as f:
    fig.savefig(f, format="png", dpi=50)
  plt.close(fig)
  assert storage.read_bytes(f"{gcs_dir}/run/domain_weights.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_files_have_the_same_bytes_locally_and_on_gcs(tmp_path, gcs_dir):
  summary = {"step": 8, "domains": ["a", "b"], "loss": [1.5, float("nan")]}
  for root in (str(tmp_path), gcs_dir):
    with storage.open(storage.join(root, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  assert storage.read_bytes(f"{gcs_dir}/summary.json") == (tmp_path / "summary.json").read_bytes()
  assert os.path.getsize(tmp_path / "summary.json") == storage.getsize(f"{gcs_dir}/summary.json")
