"""Downstream evaluation: the packed lm-eval adapter against lm-eval's own Hugging Face
backend (torch, CPU, fp32) on a tiny random Llama exported by our exporter, packing, the
generated local tasks, and two processes serving one evaluation.

Everything is built in tmp dirs from a small demo corpus (no downloads).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ddk_jax.downstream import local_tasks
from ddk_jax.downstream.packing import pack_lengths, packed_batches
from ddk_jax.downstream.scorer import PackedForward
from ddk_jax.model import ModelConfig, apply_logits, param_shapes_and_axes

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=256)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """Weights large enough that choices are far from ties (as the HF parity tests do)."""
  rng = np.random.default_rng(seed)
  shapes, _ = param_shapes_and_axes(cfg)

  def init(path, shape):
    if path[-1].key.endswith("norm"):
      return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    return (0.15 * rng.standard_normal(shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(init, shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  from ddk_jax.demo.corpus import ensure_demo_corpus
  return ensure_demo_corpus(str(tmp_path_factory.mktemp("corpus") / "c"), scale=0.05, vocab_size=512)["out_dir"]


@pytest.fixture(scope="module")
def task_dir(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tasks"))
  local_tasks.generate_local_tasks(out, corpus)
  return out


# ---- packing and the packed forward (no lm-eval needed) ----------------------------------


def test_pack_lengths_best_fit():
  lengths = [5, 9, 3, 16, 1, 7, 8, 2, 16, 4]
  rows = pack_lengths(lengths, 16)
  assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in r) <= 16 for r in rows)
  assert len(rows) == math.ceil(sum(lengths) / 16)  # these lengths pack perfectly
  assert rows[0] == [3] and rows[1] == [8]  # longest first
  with pytest.raises(ValueError, match="rows hold 1 to 16"):
    pack_lengths([3, 17], 16)
  with pytest.raises(ValueError, match="rows hold 1 to 16"):
    pack_lengths([0], 16)


def test_packed_batches_layout():
  seqs = [np.arange(1, n + 1, dtype=np.int32) for n in (6, 3, 4, 5, 2)]
  batches = list(packed_batches(seqs, None, seq_len=8, batch_size=2))
  assert len(batches) == 2  # 3 rows -> 2 batches, the last one padded with an empty row
  seen = set()
  for batch, slots in batches:
    assert batch["inputs"].shape == (2, 8)
    for s in slots:
      np.testing.assert_array_equal(batch["inputs"][s.row, s.start:s.start + s.length], seqs[s.index])
      np.testing.assert_array_equal(batch["positions"][s.row, s.start:s.start + s.length], np.arange(s.length))
      assert len(set(batch["segment_ids"][s.row, s.start:s.start + s.length])) == 1
      seen.add(s.index)
  assert seen == set(range(5))
  assert not batches[-1][0]["segment_ids"][1].any()  # the padding row


def test_score_matches_unpacked_forward_and_compiles_once():
  """Requests split across rows and batches score exactly as each one alone."""
  params = random_params(CFG, seed=1)
  fwd = PackedForward(params, CFG, seq_len=32, batch_size=2)  # host arrays: put on the device once
  rng = np.random.default_rng(0)
  seqs = [(rng.integers(0, CFG.vocab_size, n + 1), int(rng.integers(1, n + 1))) for n in
          (31, 32, 3, 17, 9, 14, 20, 5, 1, 12, 8, 26)]
  got = fwd.score(seqs)
  # Reference: each sequence alone in its own row, right-padded (causal: padding after it changes nothing).
  rows = np.zeros((len(seqs), 32), np.int32)
  for i, (tokens, _) in enumerate(seqs):
    rows[i, :len(tokens) - 1] = tokens[:-1]
  positions = np.broadcast_to(np.arange(32, dtype=np.int32), rows.shape)
  alone = np.asarray(jax.jit(lambda p, x, pos: apply_logits(p, CFG, x, pos, jax.numpy.ones_like(x)))(
      params, rows, positions)).astype(np.float64)
  for i, ((tokens, n), (logprob, greedy)) in enumerate(zip(seqs, got)):
    logits = alone[i, :len(tokens) - 1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    targets = tokens[1:]
    want = logp[np.arange(len(targets)), targets][-n:].sum()
    assert abs(logprob - want) < 1e-4, (len(tokens), n, logprob, want)
    assert greedy == bool(np.all(logits.argmax(-1)[-n:] == targets[-n:]))
  rows = len(pack_lengths([len(t) - 1 for t, _ in seqs], 32))
  assert fwd.forward_calls == math.ceil(rows / 2) > 2
  assert fwd._fn._cache_size() == 1  # one compilation for every batch, the padded last one included
  fwd.params = random_params(CFG, seed=2)  # other values of the same model (DDKJaxLM.update_params)
  assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(fwd.score(seqs), got))
  assert fwd._fn._cache_size() == 1
  with pytest.raises(ValueError, match="do not fit a row of seq_len=32"):
    fwd.score([(np.arange(34), 1)])


# ---- the local tasks ---------------------------------------------------------------------


def _docs(corpus, domain):
  with open(os.path.join(corpus, domain, "validation.jsonl")) as f:
    return [json.loads(line)["text"] for line in f]


def test_local_tasks_are_deterministic_and_well_formed(corpus, task_dir, tmp_path):
  manifest = json.loads(Path(task_dir, local_tasks.MANIFEST).read_text())
  assert sorted(manifest["tasks"]) == sorted(local_tasks.TASKS)
  again = local_tasks.generate_local_tasks(str(tmp_path / "again"), corpus)
  other_seed = local_tasks.generate_local_tasks(str(tmp_path / "seed1"), corpus, tasks=["ddk_code"], seed=1)
  for task, info in manifest["tasks"].items():
    assert info["sha256"] == again["tasks"][task]["sha256"], task  # byte-identical files
    for part in ("test", "fewshot"):
      assert (Path(task_dir, task, f"{part}.jsonl").read_bytes()
              == (tmp_path / "again" / task / f"{part}.jsonl").read_bytes())
    docs = _docs(corpus, local_tasks.TASKS[task])
    items = [json.loads(line) for line in Path(task_dir, task, "test.jsonl").read_text().splitlines()]
    assert len(items) == info["test_items"] > 0
    labels = set()
    for it in items:
      assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
      assert 0 <= it["label"] < 4 and len(it["context"]) <= 300
      labels.add(it["label"])
      # The right answer is the document's own text after the context; a distractor is not.
      assert any(it["context"] + it["choices"][it["label"]] in d for d in docs), (task, it["id"])
      wrong = [c for k, c in enumerate(it["choices"]) if k != it["label"]]
      assert not any(it["context"] + c in d for c in wrong for d in docs), (task, it["id"])
    assert len(labels) > 1 or len(items) < 4  # the answer's position varies
  assert other_seed["tasks"]["ddk_code"]["sha256"] != manifest["tasks"]["ddk_code"]["sha256"]
  # ensure_local_tasks reuses matching files and regenerates for other settings.
  mtime = os.path.getmtime(Path(task_dir, "ddk_math", "test.jsonl"))
  local_tasks.ensure_local_tasks(task_dir, corpus)
  local_tasks.ensure_local_tasks(task_dir)  # no corpus given: the one the manifest names
  assert os.path.getmtime(Path(task_dir, "ddk_math", "test.jsonl")) == mtime
  fewer = local_tasks.ensure_local_tasks(str(tmp_path / "again"), max_items=5)
  assert fewer["corpus"] == corpus and all(v["test_items"] <= 5 for v in fewer["tasks"].values())


def test_local_tasks_cli(corpus, tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run([sys.executable, "-m", "ddk_jax.downstream.local_tasks", "--out", str(out), "--corpus", corpus,
                         "--tasks", "ddk_math,ddk_prose", "--max_items", "7"], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stderr
  manifest = json.loads((out / local_tasks.MANIFEST).read_text())
  assert sorted(manifest["tasks"]) == ["ddk_math", "ddk_prose"]
  assert all(v["test_items"] <= 7 for v in manifest["tasks"].values())
  import yaml
  conf = yaml.safe_load((out / "ddk_math.yaml").read_text())
  assert conf["task"] == "ddk_math" and conf["output_type"] == "multiple_choice"
  assert conf["dataset_kwargs"]["data_files"]["test"] == str(out / "ddk_math" / "test.jsonl")


# ---- parity with lm-eval's Hugging Face backend ---------------------------------------------
# (lm-eval, torch, transformers and accelerate come with the `test` extra.)

needs_harness = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("lm_eval", "torch", "transformers", "accelerate")),
    reason="needs lm-eval with its Hugging Face backend: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def hf_dir(corpus, tmp_path_factory):
  from ddk_jax.hf import export_hf_checkpoint
  out = tmp_path_factory.mktemp("hf") / "tiny_llama"
  export_hf_checkpoint(random_params(CFG), CFG, out, architecture="LlamaForCausalLM", dtype="float32",
                       tokenizer_path=os.path.join(corpus, "tokenizer"), bos_token_id=0, eos_token_id=1)
  return str(out)


@pytest.fixture(scope="module")
def ours(hf_dir):
  from ddk_jax.downstream import DDKJaxLM
  return DDKJaxLM.from_hf(hf_dir, seq_len=256, batch_size=4)


_HF: dict = {}


def hflm(hf_dir, **kw):
  """lm-eval's own HF backend on the same checkpoint (torch fp32, CPU), cached per settings."""
  key = (hf_dir, tuple(sorted(kw.items())))
  if key not in _HF:
    from lm_eval.models.huggingface import HFLM
    _HF[key] = HFLM(pretrained=hf_dir, device="cpu", batch_size=8, dtype="float32", **kw)
  return _HF[key]


def _requests(kind, args):
  from lm_eval.api.instance import Instance
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _pairs(task_dir, ours):
  pairs = []
  for task in ("ddk_math", "ddk_code", "ddk_prose"):
    for line in Path(task_dir, task, "test.jsonl").read_text().splitlines()[:3]:
      it = json.loads(line)
      pairs += [(it["context"], c) for c in it["choices"]]
  pairs += [("", "an empty context"), ("trailing spaces   ", "move to the continuation"), ("y" * 300, " end")]
  return pairs


@needs_harness
def test_loglikelihood_matches_hf_backend(task_dir, hf_dir, ours):
  pairs = _pairs(task_dir, ours)
  got = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
  want = hflm(hf_dir, add_bos_token=True, max_length=256).loglikelihood(_requests("loglikelihood", pairs),
                                                                        disable_tqdm=True)
  assert len(got) == len(want) == len(pairs)
  for pair, (lp, greedy), (lp_ref, greedy_ref) in zip(pairs, got, want):
    assert abs(lp - lp_ref) <= 1e-4, (pair, lp, lp_ref)
    assert greedy == greedy_ref, pair
  # Token continuations the model itself predicts greedily: is_greedy is True for both.
  ctxs = [ours.tok_encode(c) for c in ("Problem 1. Compute 12 + 30.\n12 + 30 =", "def f(x):", "The")]
  token_reqs = [(None, c, g) for c, g in zip(ctxs, ours.forward.generate(ctxs, [3, 1, 4]))]
  got = ours._loglikelihood_tokens(token_reqs, disable_tqdm=True)
  want = hflm(hf_dir, add_bos_token=True, max_length=256)._loglikelihood_tokens(token_reqs, disable_tqdm=True)
  assert [g for _, g in got] == [g for _, g in want] == [True] * 3
  np.testing.assert_allclose([x for x, _ in got], [x for x, _ in want], atol=1e-4, rtol=0)
  assert ours.tok_encode("abc")[0] == 0 and ours.tok_encode("<|bos|>abc").count(0) == 1  # BOS once


@needs_harness
def test_truncation_and_rolling_match_hf_backend(corpus, task_dir, hf_dir, ours):
  """Requests longer than max_length keep their last max_length + 1 tokens (context cut from the
  left) and rolling windows of max_length tokens, as lm-eval's HF backend does."""
  from ddk_jax.downstream import DDKJaxLM
  short = DDKJaxLM(ours.forward.params, ours.model_config, ours.text_tokenizer, seq_len=96, max_length=80,
                   batch_size=4)
  pairs = _pairs(task_dir, ours)[:-1]
  got = short.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
  want = hflm(hf_dir, add_bos_token=True, max_length=80).loglikelihood(_requests("loglikelihood", pairs),
                                                                       disable_tqdm=True)
  for pair, (lp, greedy), (lp_ref, greedy_ref) in zip(pairs, got, want):
    assert abs(lp - lp_ref) <= 1e-4 and greedy == greedy_ref, pair
  with pytest.raises(ValueError, match="longer than max_length=80"):
    short.loglikelihood(_requests("loglikelihood", [("x", "word " * 90)]), disable_tqdm=True)

  texts = _docs(corpus, "code")[:3] + ["short", "<|bos|>starts with the BOS text"]
  rolled = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
  # Rolling scores the text's own tokens: the reference encodes without special tokens.
  ref = hflm(hf_dir, max_length=80).loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]),
                                                          disable_tqdm=True)
  np.testing.assert_allclose(rolled, ref, atol=1e-4, rtol=0)
  assert min(len(short.tok_encode(t, add_special_tokens=False)) for t in texts[:3]) > 3 * 80  # several windows


@needs_harness
def test_generate_until_matches_hf_backend(hf_dir, ours):
  contexts = ["Problem 1. Compute 12 + 30.\n12 + 30 =", "def f(x):\n", "The", "import"]
  args = [(c, {"until": ["\n\n", "Problem"], "max_gen_toks": 12, "do_sample": False}) for c in contexts]
  got = ours.generate_until(_requests("generate_until", args), disable_tqdm=True)
  ref = hflm(hf_dir, add_bos_token=True, max_length=256)
  want = [ref.generate_until(_requests("generate_until", [a]), disable_tqdm=True)[0] for a in args]
  assert got == want
  with pytest.raises(NotImplementedError, match="greedily"):
    ours.generate_until(_requests("generate_until", [("x", {"do_sample": True, "temperature": 0.7})]))


@needs_harness
def test_task_accuracies_match_hf_backend(task_dir, hf_dir, ours):
  import lm_eval
  from lm_eval.tasks import TaskManager

  from ddk_jax.downstream import run_tasks
  tasks = ["ddk_math", "ddk_records", "ddk_docstrings"]
  got = run_tasks(ours, tasks, limit=10, task_dir=task_dir)
  got_fewshot = run_tasks(ours, ["ddk_code"], limit=6, num_fewshot=2, task_dir=task_dir)
  ref = hflm(hf_dir, add_bos_token=True, max_length=256)
  common = dict(task_manager=TaskManager(include_defaults=False), bootstrap_iters=1000, random_seed=1234,
                numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
  want = lm_eval.simple_evaluate(model=ref, tasks=[local_tasks.task_config(t, task_dir) for t in tasks], limit=10,
                                 num_fewshot=0, **common)["results"]
  want_fewshot = lm_eval.simple_evaluate(model=ref, tasks=[local_tasks.task_config("ddk_code", task_dir)], limit=6,
                                         num_fewshot=2, **common)["results"]
  for res, ref_res in ((got, want), (got_fewshot, want_fewshot)):
    assert sorted(res) == sorted(ref_res)
    for task, metrics in res.items():
      for m in ("acc", "acc_norm"):
        assert metrics[m] == ref_res[task][f"{m},none"], (task, m)
      assert metrics["num_samples"] == ref_res[task]["sample_len"]
  assert got["ddk_math"]["num_samples"] == 10 and got_fewshot["ddk_code"]["num_samples"] == 6


@needs_harness
def test_user_task_from_include_path_matches_hf_backend(corpus, hf_dir, ours, tmp_path):
  """Any lm-eval task whose data is local: here a perplexity task (loglikelihood_rolling) over the
  prose validation documents, from a YAML file under include_path."""
  import lm_eval
  import yaml
  from lm_eval.tasks import TaskManager

  from ddk_jax.downstream import run_tasks
  conf = {"task": "prose_ppl", "dataset_path": "json", "output_type": "loglikelihood_rolling", "test_split": "test",
          "dataset_kwargs": {"data_files": {"test": os.path.join(corpus, "prose", "validation.jsonl")},
                             "cache_dir": str(tmp_path / "cache")},
          "doc_to_text": "", "doc_to_target": "text",
          "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}
  (tmp_path / "yaml").mkdir()
  (tmp_path / "yaml" / "prose_ppl.yaml").write_text(yaml.safe_dump(conf))
  got = run_tasks(ours, "prose_ppl", limit=3, include_path=str(tmp_path / "yaml"))["prose_ppl"]
  want = lm_eval.simple_evaluate(model=hflm(hf_dir, max_length=256), tasks=["prose_ppl"], limit=3,
                                 task_manager=TaskManager(include_path=str(tmp_path / "yaml"), include_defaults=False),
                                 bootstrap_iters=0)["results"]["prose_ppl"]
  assert got["num_samples"] == 3
  for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
    assert got[m] == pytest.approx(want[f"{m},none"], rel=1e-5), m


@needs_harness
def test_sharded_params_score_the_same(hf_dir, ours):
  """Params on an fsdp mesh over the (emulated) devices, batches split over them: same numbers."""
  from ddk_jax import sharding
  from ddk_jax.downstream import DDKJaxLM
  from ddk_jax.hf import load_hf_checkpoint
  mesh = sharding.make_mesh({"data": 1, "fsdp": jax.device_count(), "tensor": 1})
  params, cfg = load_hf_checkpoint(hf_dir, mesh=mesh, param_dtype="float32")
  sharded = DDKJaxLM(params, cfg, ours.text_tokenizer, seq_len=64, batch_size=3)
  assert sharded.forward.mesh is mesh and sharded.batch_size % jax.device_count() == 0
  pairs = [("Problem 1. Compute 2 + 2.\n2 + 2 =", f" {k}.") for k in range(4, 12)]
  a = sharded.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
  b = ours.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
  np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=0)
  assert [g for _, g in a] == [g for _, g in b]


@needs_harness
@pytest.mark.devices(8)
def test_from_run_serves_the_students_checkpoint(tmp_path):
  """A run's student (the latest committed step) with the run's tokenizer, on the default mesh."""
  import tiny_run

  from ddk_jax import checkpointing, sharding
  from ddk_jax.downstream import DDKJaxLM
  from ddk_jax.trainer import train
  assets = tiny_run.make_assets(str(tmp_path / "assets"))
  train(tiny_run.tiny_config(assets, steps=2, **{"checkpoint.async_save": False}), str(tmp_path / "run"))
  lm = DDKJaxLM.from_run(str(tmp_path / "run"), seq_len=64, batch_size=2)
  assert lm.text_tokenizer.path == os.path.join(assets, "tok")
  assert lm.forward.mesh.size == jax.device_count() and lm.batch_size == jax.device_count()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  cfg, params = checkpointing.restore_student_params(str(tmp_path / "run"), mesh, sharding.DEFAULT_RULES)
  single = DDKJaxLM(params, cfg, lm.text_tokenizer, seq_len=64, batch_size=2)
  pairs = [("alpha beta", " gamma"), ("", "delta epsilon"), ("one two three", " four five")]
  a = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
  b = single.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
  np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=0)


# ---- two processes -----------------------------------------------------------------------

_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    pid, port, hf_dir, task_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from ddk_jax import sharding
    from ddk_jax.downstream import DDKJaxLM, run_tasks
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})  # 2 devices per process
    lm = DDKJaxLM.from_hf(hf_dir, mesh=mesh, seq_len=256, batch_size=4)
    assert not lm.forward.params["embed"].is_fully_addressable
    res = run_tasks(lm, ["ddk_math", "ddk_records"], limit=8, task_dir=task_dir)
    print("RESULT", json.dumps(res, sort_keys=True), "BATCHES", lm.forward.forward_calls, flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@needs_harness
def test_two_processes_serve_one_evaluation(task_dir, hf_dir, ours):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), port, hf_dir, task_dir], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  deadline = time.monotonic() + 180
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  except subprocess.TimeoutExpired:
    pytest.fail("two-process evaluation hung (> 180 s)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  lines = []
  for p, text in zip(procs, outs):
    assert p.returncode == 0, text[-3000:]
    lines.append(next(line for line in text.splitlines() if line.startswith("RESULT ")))
  results = [json.loads(line.split(" ", 1)[1].rsplit(" BATCHES ", 1)[0]) for line in lines]
  batches = [int(line.rsplit(" ", 1)[1]) for line in lines]
  assert results[0] == results[1]  # every process returns the results
  assert batches[0] == batches[1] > 0  # and ran every batch
  from ddk_jax.downstream import run_tasks
  single = run_tasks(ours, ["ddk_math", "ddk_records"], limit=8, task_dir=task_dir)
  for task, metrics in single.items():
    for m in ("acc", "acc_norm", "num_samples"):
      assert results[0][task][m] == metrics[m], (task, m)
