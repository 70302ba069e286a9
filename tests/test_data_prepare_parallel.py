"""Parallel preparation: worker processes and several hosts give the same bytes as one process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import data_helpers as testing
from ddk_jax.data import prepare as P
from ddk_jax.data.config import DataConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return testing.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Three domains: a hold-out one, one with validation files and an empty document, a small one."""
  src = str(tmp_path_factory.mktemp("src"))
  testing.write_jsonl(f"{src}/a.jsonl", testing.make_texts(90, "a"))
  testing.write_jsonl(f"{src}/b1.jsonl", testing.make_texts(25, "b", seed=1))
  testing.write_jsonl(f"{src}/b2.jsonl", testing.make_texts(20, "bb", seed=2) + [""])
  testing.write_jsonl(f"{src}/bval.jsonl", testing.make_texts(12, "bv", seed=3))
  testing.write_jsonl(f"{src}/c.jsonl", testing.make_texts(14, "c", seed=4))
  return [{"name": "a", "train": [f"{src}/a.jsonl"]},
          {"name": "b", "train": [f"{src}/b1.jsonl", f"{src}/b2.jsonl"], "validation": [f"{src}/bval.jsonl"]},
          {"name": "c", "train": [f"{src}/c.jsonl"], "num_validation_docs": 3}]


def _cfg(tmp, sources, tok_dir, **kw):
  kw.setdefault("docs_per_shard", 10)
  kw.setdefault("tokenize_batch_size", 4)
  return testing.data_config(str(tmp), sources, tok_dir, **kw)


def _files(prepared_dir):
  """{relative path: bytes} of everything under prepared_dir."""
  out = {}
  for root, _, names in os.walk(prepared_dir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, prepared_dir)] = f.read()
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sources, tok_dir):
  """The single-process preparation: {relative path: bytes}."""
  cfg = _cfg(tmp_path_factory.mktemp("ref"), sources, tok_dir, num_prepare_workers=1)
  P.prepare(cfg, progress=False, log=None)
  files = _files(cfg.prepared_dir)
  # a: 9 + 1 shards, b: 5 + 2, c: 2 + 1.
  assert len([f for f in files if f.endswith(".array_record")]) == 20
  assert not [f for f in files if ".tmp-" in f]
  return files


def test_workers_give_the_same_bytes(tmp_path, sources, tok_dir, reference, monkeypatch):
  logs = []
  cfg = _cfg(tmp_path / "two", sources, tok_dir, num_prepare_workers=2)
  m = P.prepare(cfg, progress=True, log=logs.append)
  assert _files(cfg.prepared_dir) == reference
  assert json.loads(reference["manifest.json"]) == m
  assert [line.split(":")[0] for line in logs] == ["[prepare] a", "[prepare] b", "[prepare] c"]
  # Automatic mode: the first shards in this process, then a pool of one worker per core.
  monkeypatch.setattr(P, "_AUTO_INLINE_CHARS", 1500)
  cfg = _cfg(tmp_path / "auto", sources, tok_dir, num_prepare_workers=0)
  P.prepare(cfg, progress=False, log=None)
  assert _files(cfg.prepared_dir) == reference


def _die_in_shard(job):
  """Runs in a worker process: dies (SIGKILL) half-way through shard 3 of a/train."""
  if (job.domain, job.split, job.index) == ("a", "train", 3):
    with open(f"{job.base}.array_record{P.tmp_tag()}", "wb") as f:
      f.write(b"half a shard")
    time.sleep(1.0)  # let the shards before it finish
    os.kill(os.getpid(), signal.SIGKILL)
  return P._run_shard_job(job)  # pylint: disable=protected-access


def test_killed_worker_then_resume(tmp_path, sources, tok_dir, reference, monkeypatch):
  cfg = _cfg(tmp_path, sources, tok_dir, num_prepare_workers=2)
  train_dir = os.path.join(cfg.prepared_dir, "a", "train")
  monkeypatch.setattr(P, "_run_shard_job", _die_in_shard)
  with pytest.raises(P.PrepareError, match=r"worker process died.*rerunning prepare resumes"):
    P.prepare(cfg, progress=False, log=None)
  monkeypatch.undo()
  names = os.listdir(train_dir)
  assert not os.path.exists(os.path.join(cfg.prepared_dir, "manifest.json"))
  assert "shard-00003.json" not in names and "shard-00003.array_record" not in names
  assert any(n.startswith("shard-00003.array_record.tmp-") for n in names)
  finished = {n: os.stat(os.path.join(train_dir, n)).st_mtime_ns for n in names if n.endswith(".json")}
  assert {"shard-00000.json", "shard-00001.json", "shard-00002.json"} <= set(finished)

  P.prepare(cfg, progress=False, log=None)
  names = os.listdir(train_dir)
  assert not [n for n in names if ".tmp-" in n]
  # Finished shards were not redone; the result is the one-process result.
  assert {n: os.stat(os.path.join(train_dir, n)).st_mtime_ns for n in finished} == finished
  assert _files(cfg.prepared_dir) == reference


def test_process_arguments_are_checked(tmp_path, sources, tok_dir):
  cfg = _cfg(tmp_path, sources, tok_dir)
  with pytest.raises(DataConfigError, match=r"process_count=2.*jax.distributed.initialize"):
    P.prepare(cfg, progress=False, log=None, process_index=1, process_count=2)
  with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
    P.prepare(cfg, progress=False, log=None, process_index=2, process_count=2)
  cfg.num_prepare_workers = -1
  with pytest.raises(DataConfigError, match=r"data.num_prepare_workers must be an integer >= 0"):
    P.prepare(cfg, progress=False, log=None)


# --------------------------------------------------------------------------------------------- two hosts --

_HOST = textwrap.dedent("""
    import hashlib, json, sys
    import jax
    pid, port, cfg_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    import ml_collections
    from ddk_jax.data import prepare as P
    P._SHARED_DIR_WAIT_S = 2.0
    with open(cfg_file) as f:
      cfg = ml_collections.ConfigDict(json.load(f)[pid])
    written = []
    real = P._write_shard
    P._write_shard = lambda job, *a, **k: written.append(job.describe()) or real(job, *a, **k)
    try:
      m = P.prepare(cfg, progress=False, log=None)
    except Exception as e:
      print("ERROR", type(e).__name__, e, flush=True)
      sys.exit(3)
    print("WROTE", json.dumps(written), flush=True)
    print("MANIFEST", hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest(), flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_hosts(tmp_path, cfgs):
  cfg_file = tmp_path / "cfgs.json"
  cfg_file.write_text(json.dumps([c.to_dict() for c in cfgs]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _HOST, str(i), port, str(cfg_file)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  deadline = time.monotonic() + 150
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  except subprocess.TimeoutExpired:
    pytest.fail("two-process prepare hung (> 150 s)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, text) for p, text in zip(procs, outs)]


def _line(text, tag):
  return next(line.split(" ", 1)[1] for line in text.splitlines() if line.startswith(tag + " "))


def test_two_hosts_share_the_work_and_match_one_host(tmp_path, sources, tok_dir, reference):
  cfg = _cfg(tmp_path, sources, tok_dir, num_prepare_workers=1)
  results = _run_two_hosts(tmp_path, [cfg, cfg])
  for rc, text in results:
    assert rc == 0, text[-3000:]
  assert _files(cfg.prepared_dir) == reference
  # Each shard was tokenized once, by one of the hosts; both got the manifest.
  wrote = [json.loads(_line(text, "WROTE")) for _, text in results]
  assert wrote[0] and wrote[1] and not set(wrote[0]) & set(wrote[1])
  assert len(wrote[0]) + len(wrote[1]) == 20
  digest = hashlib.sha256(json.dumps(json.loads(reference["manifest.json"]), sort_keys=True).encode()).hexdigest()
  assert [_line(text, "MANIFEST") for _, text in results] == [digest, digest]


def test_two_hosts_with_unshared_dirs_fail_clearly(tmp_path, sources, tok_dir):
  cfgs = [_cfg(tmp_path / f"host{i}", sources, tok_dir, num_prepare_workers=1) for i in range(2)]
  for rc, text in _run_two_hosts(tmp_path, cfgs):
    assert rc == 3, text[-3000:]
    assert "ERROR DataConfigError" in text and "this host does not see" in text, text[-3000:]
    assert "must be one directory that every host sees" in text
