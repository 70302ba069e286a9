"""Pre-training a model from scratch when a config asks for it (`<model>.pretrain_steps`).

With `source='workdir'` and `pretrain_steps > 0`, the model is first trained with plain
CE (mode `cpt`, the run's own data, uniform mixture) into `path` (relative paths live
inside the run's workdir), and then used from there.  The demo gets its teacher (and its
student base) this way; a finished pre-training is reused, an interrupted one resumes.
"""

from __future__ import annotations

import copy
import logging
import os

import ml_collections

from ddk_jax import storage
from ddk_jax.errors import TrainingError

_log = logging.getLogger("ddk_jax")


def _resolve_model_path(cfg: ml_collections.ConfigDict, which: str, workdir: str) -> None:
  section = cfg[which]
  if section.source == "workdir" and section.path and not os.path.isabs(section.path) \
      and not storage.is_remote(section.path):
    section.path = storage.join(storage.resolve(workdir), section.path)


def _check_model_source(cfg: ml_collections.ConfigDict, which: str) -> None:
  """Fails before any work when a model the run reads from disk is not there."""
  from ddk_jax import checkpointing
  section = cfg[which]
  if section.source == "hf":
    from ddk_jax import hf
    hf.validate_checkpoint_dir(section.path)  # config.json + safetensors headers; errors name the file
  elif (section.source == "workdir" and int(section.pretrain_steps) <= 0
        and checkpointing.latest_good_step(section.path) is None):
    raise TrainingError(
        f"{which}.source='workdir' but {which}.path={section.path!r} has no committed checkpoint to take the "
        f"{which} from. Train that run first (python -m ddk_jax.main --workdir={section.path} ...), set "
        f"{which}.pretrain_steps > 0 to pre-train it there, or point {which}.path at a finished run.")


def check_teacher_tokenizer(cfg: ml_collections.ConfigDict) -> None:
  """Fails at start when a Hugging Face teacher ships another tokenizer than the run's.

  Logit KD compares the two models id by id; the run tokenizes with `data.tokenizer` (the
  student's by default), so a teacher directory with a tokenizer.json must give every text
  the same ids. Embedding sizes may differ (padding); the vocabularies may not.
  """
  teacher, run_tok = cfg.teacher.path, cfg.data.tokenizer
  if cfg.teacher.source != "hf" or not run_tok or str(teacher) == str(run_tok) \
      or not storage.exists(storage.join(teacher, "tokenizer.json")):
    return
  from ddk_jax.data import tokenizer as tok_lib
  from ddk_jax.data.config import DataConfigError
  overrides = {k: cfg.data.get(k) for k in ("bos_token", "eos_token")}  # the run's BOS/EOS, for both
  try:
    theirs = tok_lib.load_tokenizer_from_config(dict(overrides, tokenizer=teacher))
    ours = tok_lib.load_tokenizer_from_config(dict(overrides, tokenizer=run_tok))
    tok_lib.check_same_tokenizer(theirs, ours, names=(
        "teacher", "student" if str(run_tok) == str(cfg.student.path) else "data.tokenizer's"))
  except DataConfigError as e:
    raise TrainingError(f"teacher.path={teacher!r}: {e}") from None


def _pretrain_config(cfg: ml_collections.ConfigDict, which: str) -> ml_collections.ConfigDict:
  section = cfg[which]
  pre = ml_collections.ConfigDict(cfg.to_dict())
  pre.mode = "cpt"
  pre.steps = int(section.pretrain_steps)
  pre.student.source = "random"
  pre.student.path = ""
  pre.student.pretrain_steps = 0
  pre.student.model = ml_collections.ConfigDict(section.model.to_dict())
  pre.student.model.param_dtype = "float32"  # train in fp32; the user of it may cast
  pre.teacher.source = "random"
  pre.teacher.path = ""
  pre.teacher.pretrain_steps = 0
  pre.optimizer.learning_rate = float(section.pretrain_learning_rate)
  pre.optimizer.warmup_steps = min(int(cfg.optimizer.warmup_steps), max(pre.steps // 10, 1))
  pre.optimizer.schedule = "cosine"
  pre.seed = int(cfg.seed) + (101 if which == "teacher" else 202)
  pre.checkpoint.every = max(pre.steps // 4, 1)
  pre.ddk.interval = pre.steps
  pre.ddk.update_at_start = False
  pre.eval.tasks = ""  # downstream tasks judge the distilled student, not its pre-training
  pre.data.domains = [dict(d, weight=1.0) for d in pre.data.domains]
  return pre


def prepare_models(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[ml_collections.ConfigDict, str]:
  """Resolves model paths, checks the checkpoints the run reads, builds the demo corpus when
  the config names one, and runs requested pre-training (teacher first).

  Returns the resolved config (a copy; `cfg` is not changed) and "ready", or "preempted"
  when a SIGTERM stopped a pre-training (it resumes when the same command runs again).
  """
  from ddk_jax import trainer

  cfg = copy.deepcopy(cfg)
  models = ("student",) if cfg.mode == "cpt" else ("teacher", "student")
  for which in models:
    _resolve_model_path(cfg, which, workdir)
    _check_model_source(cfg, which)
  if not cfg.data.tokenizer and cfg.student.source == "hf":
    cfg.data.tokenizer = cfg.student.path  # HF checkpoints ship their tokenizer
  if "teacher" in models:
    check_teacher_tokenizer(cfg)
  if cfg.data.get("demo_corpus_dir"):
    from ddk_jax.demo import corpus
    corpus.ensure_demo_corpus(cfg.data.demo_corpus_dir, log=_log.info)
  for which in models:
    section = cfg[which]
    if section.source != "workdir" or int(section.pretrain_steps) <= 0:
      continue
    if storage.exists(storage.join(section.path, "summary.json")):
      _log.info("%s: using the pre-trained model in %s", which, section.path)
      continue
    _log.info("%s: pre-training %d steps (mode cpt) into %s", which, int(section.pretrain_steps), section.path)
    result = trainer.train(_pretrain_config(cfg, which), section.path)
    if result["status"] == "preempted":
      return cfg, "preempted"
    if result["status"] != "done":
      raise TrainingError(f"pre-training of the {which} stopped at step {result['step']} "
                          f"({result['status']}); rerun the same command to resume it.")
  return cfg, "ready"
