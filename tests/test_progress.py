"""Progress output: training lines and ETA, HF import/export progress, and log records written
around open tqdm bars (never on a bar's line)."""

from __future__ import annotations

import io
import logging
import re

import jax
import numpy as np
import pytest

from ddk_jax import cli, reporting
from ddk_jax.hf import export_hf_checkpoint, load_hf_checkpoint
from ddk_jax.model import ModelConfig, param_shapes_and_axes

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, num_kv_heads=1,
                  tie_word_embeddings=False)
# embed + 9 per layer + final_norm + lm_head
NUM_TENSORS = 1 + 9 * CFG.num_layers + 2


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  c = Clock()
  monkeypatch.setattr(reporting.time, "monotonic", c)
  monkeypatch.setattr(cli.time, "monotonic", c)
  return c


def _messages(caplog, logger="ddk_jax"):
  return [r.getMessage() for r in caplog.records if r.name == logger]


# ---- training progress ---------------------------------------------------------------------------


def test_plain_lines_when_the_bar_is_off(caplog, clock):
  caplog.set_level(logging.INFO, logger="ddk_jax")
  p = reporting.Progress(300, 0, enabled=False)  # logging.progress_bar=False on process 0
  clock.now += 50
  p.update(10, loss=3.25, tok_s=12345.6, mfu=0.0234)
  clock.now += 20
  p.update(20, loss=3.0, tok_s=11000.0, mfu=0.02)
  p.close()
  lines = _messages(caplog)
  assert len(lines) == 2
  assert lines[0].startswith("step 10/300 (3%)")
  for part in ("loss 3.2500", "12,346 tok/s", "MFU 2.3%", "ETA "):
    assert part in lines[0], lines[0]
  assert "step 20/300" in lines[1] and "loss 3.0000" in lines[1]


def test_eta_uses_the_pace_after_the_first_update(caplog, clock):
  caplog.set_level(logging.INFO, logger="ddk_jax")
  p = reporting.Progress(100, 0, enabled=False)
  clock.now += 100  # the first 10 steps include compilation
  p.update(10, loss=1.0, tok_s=1.0, mfu=0.0)
  assert p.eta_seconds(10) == pytest.approx(900)  # 100 s / 10 steps x 90 left
  clock.now += 10  # then 1 s/step
  p.update(20, loss=1.0, tok_s=1.0, mfu=0.0)
  assert p.eta_seconds(20) == pytest.approx(80)
  clock.now += 80
  p.update(100, loss=1.0, tok_s=1.0, mfu=0.0)
  lines = _messages(caplog)
  assert lines[0].endswith("ETA 15m00s")
  assert lines[1].endswith("ETA 1m20s")
  assert lines[2].endswith("done in 3m10s")


def test_resumed_run_counts_from_its_first_step(clock):
  p = reporting.Progress(1000, 600, enabled=False)
  clock.now += 40
  assert p.eta_seconds(610) == pytest.approx(40 / 10 * 390)


def test_other_processes_stay_silent(caplog, clock, monkeypatch):
  caplog.set_level(logging.INFO, logger="ddk_jax")
  monkeypatch.setattr(cli, "is_main_process", lambda: False)
  p = reporting.Progress(10, 0, enabled=False)
  p.update(5, loss=1.0, tok_s=1.0, mfu=0.0)
  assert not _messages(caplog)


def test_bar_on_a_terminal_and_lines_elsewhere(caplog, monkeypatch):
  caplog.set_level(logging.INFO, logger="ddk_jax")
  monkeypatch.setattr(cli, "stderr_is_tty", lambda: False)
  p = reporting.Progress(10, 0, enabled=True)  # progress_bar=True in a batch job: lines, not a bar
  p.update(5, loss=1.0, tok_s=1.0, mfu=0.0)
  p.close()
  assert len(_messages(caplog)) == 1
  caplog.clear()
  monkeypatch.setattr(cli, "stderr_is_tty", lambda: True)
  p = reporting.Progress(10, 0, enabled=True)
  assert cli.bars_open()
  p.update(5, loss=1.0, tok_s=1.0, mfu=0.0)
  p.close()
  assert not _messages(caplog)
  assert not cli.bars_open()


# ---- log records and bars ------------------------------------------------------------------------


def _handler(stream):
  h = cli.TqdmAwareHandler(stream)
  h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
  return h


def test_handler_writes_through_tqdm_while_a_bar_is_open(monkeypatch):
  from tqdm import tqdm

  out = io.StringIO()
  handler = _handler(out)
  log = logging.getLogger("ddk_jax.test_progress")
  log.propagate = False
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  writes = []
  real_write = tqdm.write
  monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: (writes.append(s),
                                                                                   real_write(s, file=file, **kw))))
  try:
    log.info("no bar yet")
    assert writes == [] and out.getvalue() == "INFO no bar yet\n"
    bar = tqdm(total=10, file=out, desc="bar", mininterval=0, ascii=True)
    bar.update(3)
    log.info("while the bar is open")
    bar.update(3)
    bar.close()
    log.info("bar closed")
  finally:
    log.removeHandler(handler)
    log.propagate = True
  assert writes == ["INFO while the bar is open"]
  text = out.getvalue()
  assert text.endswith("INFO bar closed\n")
  # The record has a line of its own: the bar's text was cleared before it, redrawn after it.
  line = next(l for l in text.split("\n") if "while the bar is open" in l)
  assert line.split("\r")[-1] == "INFO while the bar is open"


def test_setup_logging_installs_the_tqdm_aware_handler():
  root = logging.getLogger()
  saved = root.handlers[:], root.level
  try:
    cli.setup_logging()
    assert any(isinstance(h, cli.TqdmAwareHandler) for h in root.handlers)
    assert root.level == logging.INFO
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


# ---- HF import / export --------------------------------------------------------------------------


def _random_params(cfg):
  rng = np.random.default_rng(0)
  shapes, _ = param_shapes_and_axes(cfg)
  return jax.tree.map(lambda s: rng.normal(0, 0.05, s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def params():
  return _random_params(CFG)


def _progress_lines(caplog, what):
  return [m for m in _messages(caplog, "ddk_jax.hf") if m.startswith(what)]


def test_hf_export_and_import_log_progress(params, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="ddk_jax.hf")
  out = tmp_path / "ckpt"
  export_hf_checkpoint(params, CFG, out, dtype="float32", progress=False)
  lines = _progress_lines(caplog, "HF export ckpt:")
  total_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
  # ~every 10% of the bytes, then a last line with the totals.
  assert 5 <= len(lines) <= 12, lines
  assert lines[-1].startswith(f"HF export ckpt: {NUM_TENSORS}/{NUM_TENSORS} tensors (100%)")
  assert "done in" in lines[-1]
  counts = [int(re.search(r": (\d+)/", l).group(1)) for l in lines]
  assert counts == sorted(counts) and counts[0] < NUM_TENSORS
  assert total_bytes > 0
  caplog.clear()
  _, cfg = load_hf_checkpoint(out, param_dtype="float32", progress=False)
  assert cfg.num_layers == CFG.num_layers
  lines = _progress_lines(caplog, "HF import ckpt:")
  assert 5 <= len(lines) <= 12, lines
  assert lines[-1].startswith(f"HF import ckpt: {NUM_TENSORS}/{NUM_TENSORS} tensors (100%)")
  assert "ETA" in lines[0] and "KiB" in lines[0]


def test_hf_progress_every_n_tensors(params, tmp_path, caplog, monkeypatch):
  # A checkpoint dominated by one huge tensor still reports every N tensors.
  caplog.set_level(logging.INFO, logger="ddk_jax.hf")
  real = cli.TransferProgress
  monkeypatch.setattr("ddk_jax.hf.hf_export.TransferProgress",
                      lambda *a, **kw: real(*a, **{**kw, "every": 4, "fraction": 1.0}))
  export_hf_checkpoint(params, CFG, tmp_path / "c", dtype="float32", progress=False)
  counts = [int(re.search(r": (\d+)/", l).group(1)) for l in _progress_lines(caplog, "HF export c:")]
  assert counts == list(range(4, NUM_TENSORS, 4)) + [NUM_TENSORS]


def test_hf_bar_when_asked(params, tmp_path, caplog, capsys):
  caplog.set_level(logging.INFO, logger="ddk_jax.hf")
  export_hf_checkpoint(params, CFG, tmp_path / "c", dtype="float32", progress=True)
  err = capsys.readouterr().err
  assert "HF export c" in err and f"tensors {NUM_TENSORS}/{NUM_TENSORS}" in err and "100%" in err
  assert not _progress_lines(caplog, "HF export")  # the bar replaces the log lines
  assert not cli.bars_open()


def test_no_progress_on_other_processes(params, tmp_path, caplog, monkeypatch):
  caplog.set_level(logging.INFO, logger="ddk_jax.hf")
  export_hf_checkpoint(params, CFG, tmp_path / "c", dtype="float32", progress=False)
  caplog.clear()
  monkeypatch.setattr(cli, "is_main_process", lambda: False)
  load_hf_checkpoint(tmp_path / "c", param_dtype="float32", progress=True)
  assert not _progress_lines(caplog, "HF import")
  assert not cli.bars_open()


def test_failed_export_has_no_done_line(params, tmp_path, caplog, monkeypatch):
  from ddk_jax.hf import hf_export

  caplog.set_level(logging.INFO, logger="ddk_jax.hf")
  calls = []

  def flaky(x):
    calls.append(1)
    if len(calls) == 5:
      raise OSError("disk full")
    return np.asarray(x)

  monkeypatch.setattr(hf_export, "_to_host", flaky)
  with pytest.raises(OSError):
    export_hf_checkpoint(params, CFG, tmp_path / "c", dtype="float32", progress=False)
  assert not any("done in" in l for l in _progress_lines(caplog, "HF export"))
