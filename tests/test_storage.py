"""ddk_jax.storage: every operation on a local directory and on a gs:// bucket (the local
GCS emulator of gcs_emulator.py).  Local results must be byte for byte what plain file
calls give."""

from __future__ import annotations

import json
import os

import pytest

from ddk_jax import storage


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  """A run directory that does not exist yet: local, or a fresh prefix in the bucket."""
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("gcs_dir") + "/run"


# ---- paths ---------------------------------------------------------------------------------


def test_is_remote():
  assert storage.is_remote("gs://b/run") and storage.is_remote("s3://b/x") and storage.is_remote("GS://b")
  assert not storage.is_remote("runs/demo") and not storage.is_remote("/abs/p")
  assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("./gs:/b/run")


def test_resolve(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert storage.resolve("runs/demo") == str(tmp_path / "runs" / "demo")
  assert storage.resolve("~/r") == str(tmp_path / "home" / "r")
  assert storage.resolve("file:///tmp/x") == "/tmp/x"
  assert storage.resolve("gs://bucket/run/") == "gs://bucket/run"
  assert storage.resolve("gs://bucket/run") == "gs://bucket/run"
  with pytest.raises(ValueError, match="names no bucket"):
    storage.resolve("gs://")


def test_require_local(tmp_path):
  assert storage.require_local(str(tmp_path), "data.prepared_dir", "fix") == str(tmp_path)
  with pytest.raises(ValueError, match=r"^data.prepared_dir=gs://b/prep must be a local path; mount the bucket"):
    storage.require_local("gs://b/prep", "data.prepared_dir", "mount the bucket with gcsfuse")


def test_join():
  assert storage.join("/a", "b", "c.txt") == os.path.join("/a", "b", "c.txt")
  assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert storage.join("gs://b/run/", "x/", "y") == "gs://b/run/x/y"
  with pytest.raises(ValueError, match="leave the bucket"):
    storage.join("gs://b/run", "/etc")


def test_missing_driver_is_named():
  with pytest.raises(storage.StorageError, match=r"s3://.*needs s3fs.*pip install s3fs"):
    storage.exists("s3://bucket/run/metrics.jsonl")


# ---- files ---------------------------------------------------------------------------------


def test_file_operations(root):
  storage.makedirs(root)
  storage.makedirs(root)  # idempotent
  path = storage.join(root, "report.md")
  assert not storage.exists(path)
  storage.write_text(path, "# report\nü\n")
  assert storage.exists(path) and storage.exists(root) and storage.isdir(root) and not storage.isdir(path)
  assert storage.read_text(path) == "# report\nü\n"
  assert storage.read_bytes(path) == "# report\nü\n".encode()
  assert storage.getsize(path) == len("# report\nü\n".encode())
  storage.makedirs(storage.join(root, "sub"))
  storage.write_bytes(storage.join(root, "sub", "a.bin"), b"\x00\x01")
  if not storage.is_remote(root):
    assert open(path, encoding="utf-8").read() == "# report\nü\n"
  assert storage.listdir(root) == ["report.md", "sub"]
  assert storage.listdir(storage.join(root, "sub")) == ["a.bin"]
  storage.remove(path)
  assert not storage.exists(path)
  for call in (storage.remove, storage.getsize, storage.read_bytes, storage.listdir):
    with pytest.raises(FileNotFoundError):
      call(storage.join(root, "nope"))


def test_open_text_and_binary(root):
  storage.makedirs(root)
  with storage.open(storage.join(root, "summary.json"), "w") as f:
    json.dump({"a": [1, 2]}, f, indent=1)
  with storage.open(storage.join(root, "summary.json")) as f:
    assert json.load(f) == {"a": [1, 2]}
  with storage.open(storage.join(root, "blob"), "wb") as f:
    f.write(b"abc")
    f.write(b"def")
  with storage.open(storage.join(root, "blob"), "rb") as f:
    f.seek(2)
    assert f.read(3) == b"cde"


def test_remote_open_refuses_append(gcs_dir):
  for mode in ("a", "ab", "r+", "w+"):
    with pytest.raises(ValueError, match="cannot be appended.*AppendLog"):
      storage.open(f"{gcs_dir}/metrics.jsonl", mode)


def test_write_bytes_atomic(root):
  storage.makedirs(root)
  path = storage.join(root, "manifest.json")
  storage.write_bytes_atomic(path, b"old")
  storage.write_bytes_atomic(path, b"new contents")
  assert storage.read_bytes(path) == b"new contents"
  assert storage.listdir(root) == ["manifest.json"]  # no temporary file left behind


def test_write_bytes_atomic_failure_keeps_old_file(tmp_path):
  path = str(tmp_path / "manifest.json")
  storage.write_bytes_atomic(path, b"old")
  with pytest.raises(TypeError):
    storage.write_bytes_atomic(path, "not bytes")  # fails while writing the temporary file
  assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["manifest.json"]


def test_truncate(root):
  storage.makedirs(root)
  path = storage.join(root, "metrics.jsonl")
  storage.write_bytes(path, b"row1\nrow2\nrow3\n")
  storage.truncate(path, 10)
  assert storage.read_bytes(path) == b"row1\nrow2\n"


def test_upload_file_and_dir(tmp_path, root):
  src = tmp_path / "src"
  (src / "nested").mkdir(parents=True)
  (src / "a.txt").write_text("a")
  (src / "nested" / "b.bin").write_bytes(b"\x01\x02")
  copied = storage.upload_dir(str(src), root)
  assert copied == ["a.txt", "nested/b.bin"]
  assert storage.read_text(storage.join(root, "a.txt")) == "a"
  assert storage.read_bytes(storage.join(root, "nested", "b.bin")) == b"\x01\x02"
  storage.upload_file(str(src / "a.txt"), storage.join(root, "copy", "a2.txt"))
  assert storage.read_text(storage.join(root, "copy", "a2.txt")) == "a"


# ---- check_writable ------------------------------------------------------------------------


def test_check_writable_ok(root):
  assert storage.check_writable(root) == storage.resolve(root)
  assert storage.exists(root) == (not storage.is_remote(root))  # a bucket has no empty directories
  if storage.exists(root):
    assert storage.listdir(root) == []  # the probe is gone


def test_check_writable_local_failure():
  with pytest.raises(storage.StorageError, match=r"^workdir '/proc/ddk_no_such_dir/run' is not writable \(.+\); "
                                                  r"pass --workdir= a directory you can write to\.$") as e:
    storage.check_writable("/proc/ddk_no_such_dir/run")
  assert isinstance(e.value, OSError) and e.value.errno


def test_check_writable_missing_bucket(gcs_bucket):
  with pytest.raises(storage.StorageError, match=r"gs://no-such-bucket-ddk/run' is not writable.*bucket "
                                                  r"'no-such-bucket-ddk' exists.*roles/storage.objectAdmin"):
    storage.check_writable("gs://no-such-bucket-ddk/run")


# ---- AppendLog -----------------------------------------------------------------------------


def test_append_log_local_is_the_plain_file(tmp_path):
  rows = ['{"step": 1, "loss": 2.5}\n', '{"step": 2, "kind": "ü"}\n']
  plain = tmp_path / "plain.jsonl"
  with open(plain, "a", encoding="utf-8") as f:
    for r in rows:
      f.write(r)
      f.flush()
  path = str(tmp_path / "metrics.jsonl")
  log = storage.AppendLog(path)
  for r in rows:
    log.write(r)
    log.flush()
    assert open(path, "rb").read() == plain.read_bytes()[:log.size()]  # on disk at every flush
  log.close()
  assert open(path, "rb").read() == plain.read_bytes()
  with storage.AppendLog(path) as log:  # reopening appends
    log.write("x\n")
  assert open(path, "rb").read() == plain.read_bytes() + b"x\n"


def test_append_log_resume(root):
  """The resume pattern: size() recorded at a checkpoint, truncate(size) on restart."""
  storage.makedirs(root)
  path = storage.join(root, "metrics.jsonl")
  log = storage.AppendLog(path, upload_every_s=0)
  log.write("r1\n")
  log.write("r2\n")
  log.flush_remote()
  saved = log.size()
  assert saved == 6 and storage.getsize(path) == 6
  log.write("r3 logged after the checkpoint\n")
  log.close()
  log = storage.AppendLog(path)
  assert log.size() == 6 + 31
  assert log.truncate(saved) == 31
  assert storage.read_bytes(path) == b"r1\nr2\n"  # stored at once, before any new row
  assert log.truncate(100) == 0  # never extended
  log.write("r3\n")
  log.close()
  assert storage.read_bytes(path) == b"r1\nr2\nr3\n"
  with pytest.raises(ValueError, match="closed"):
    log.write("late\n")
  log.close()  # idempotent


def test_append_log_remote_uploads_on_schedule(gcs_dir):
  path = f"{gcs_dir}/metrics.jsonl"
  log = storage.AppendLog(path, upload_every_s=3600)
  log.write("r1\n")
  log.flush()  # within the interval: nothing uploaded yet
  assert not storage.exists(path) and log.size() == 3
  log.flush_remote()
  assert storage.read_bytes(path) == b"r1\n"
  log.upload_every_s = 0
  log.write("r2\n")
  log.flush()
  assert storage.read_bytes(path) == b"r1\nr2\n"
  log.close()


# ---- LocalMirror ---------------------------------------------------------------------------


def test_local_mirror_of_a_local_dir_is_the_dir(tmp_path):
  target = str(tmp_path / "run" / "tensorboard")
  with storage.LocalMirror(target) as m:
    assert m.local == target and not os.path.exists(target)  # nothing created or copied
    os.makedirs(m.local)
    open(os.path.join(m.local, "events"), "w").write("e")
    assert m.sync() == []
  assert os.listdir(target) == ["events"]


def test_local_mirror_uploads_changed_files(gcs_dir):
  target = f"{gcs_dir}/run/tensorboard"
  m = storage.LocalMirror(target)
  assert m.local != target and os.path.isdir(m.local)
  with open(os.path.join(m.local, "events.1"), "wb") as f:
    f.write(b"abc")
  os.makedirs(os.path.join(m.local, "plugins"))
  with open(os.path.join(m.local, "plugins", "p.json"), "w") as f:
    f.write("{}")
  assert m.sync() == ["events.1", "plugins/p.json"]
  assert m.sync() == []  # unchanged
  with open(os.path.join(m.local, "events.1"), "ab") as f:
    f.write(b"def")
  assert m.sync() == ["events.1"]
  assert storage.read_bytes(f"{target}/events.1") == b"abcdef"
  with open(os.path.join(m.local, "late"), "w") as f:
    f.write("x")
  local = m.local
  m.close()
  assert not os.path.exists(local)
  assert storage.listdir(target) == ["events.1", "late", "plugins"]
