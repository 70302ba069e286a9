"""Run outputs: metrics (JSONL + TensorBoard), the progress bar, plots and report.md."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ddk_jax import storage

_log = logging.getLogger("ddk_jax")


def _named(e: OSError, path: str) -> OSError:
  """`e` with the file it concerns (a failed flush does not say)."""
  return e if e.filename else OSError(e.errno, e.strerror or str(e), str(path))


class MetricsWriter:
  """Appends `{"step", "kind", ...}` rows to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._file = None
    self._tb = None
    self._tb_dir = None
    if not enabled:
      return
    # On gs:// the log is uploaded whole (objects cannot be appended to) at every checkpoint
    # (`sync`) and at the end; TensorBoard writes into a local mirror uploaded at the same times.
    self._file = storage.AppendLog(storage.join(workdir, "metrics.jsonl"))
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb_dir = storage.LocalMirror(storage.join(workdir, "tensorboard"))
      self._tb = SummaryWriter(self._tb_dir.local)

  def write(self, step: int, values: dict[str, float], kind: str) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
    row.update({k: float(v) for k, v in values.items()})
    try:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    except OSError as e:
      raise _named(e, self._file.path) from e
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k if "/" in k else f"{kind}/{k}", float(v), int(step))

  def sync(self) -> None:
    """Stores everything written so far (on gs://: uploads metrics.jsonl and the events)."""
    if not self.enabled:
      return
    try:
      self._file.flush_remote()
    except OSError as e:
      raise _named(e, self._file.path) from e
    if self._tb is not None:
      self._tb.flush()
      self._tb_dir.sync()

  def size(self) -> int:
    """Bytes written to metrics.jsonl so far (saved in checkpoints, see `truncate`)."""
    self.sync()
    return self._file.size()

  def truncate(self, size: int, restored_step: int | None) -> None:
    """Makes metrics.jsonl read like an uninterrupted run: rows logged after the checkpoint
    the run resumes from (or, with no checkpoint, by an earlier attempt) are dropped."""
    current = self._file.size()
    if current > size:
      self._file.truncate(size)
      what = (f"after checkpoint step {restored_step}" if restored_step is not None
              else "by an attempt with no checkpoint")
      _log.info("metrics.jsonl: dropped %d bytes of rows logged %s (they are logged again).", current - size, what)
    elif current < size:
      _log.warning("metrics.jsonl is shorter (%d bytes) than when step %s was saved (%d bytes); rows before the "
                   "resume point are missing from it.", current, restored_step, size)

  def close(self) -> None:
    if self._file:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
      self._tb_dir.close()


class Progress:
  """Training progress: step/total, loss, tokens/s, MFU and ETA.

  `enabled` is the trainer's "process 0 and logging.progress_bar". Enabled with stderr a
  terminal (or `bar=True`): a tqdm bar.  Otherwise process 0 logs one plain line per
  `update` (logger "ddk_jax", INFO), so batch jobs and `logging.progress_bar=False` runs
  still show where they are; other processes stay silent.  The ETA comes from the pace
  since the first update (which includes compilation, so the first ETA is high).
  """

  def __init__(self, total: int, initial: int, enabled: bool, *, bar: bool | None = None, logger=None):
    import logging  # pylint: disable=g-import-not-at-top
    from ddk_jax import cli  # pylint: disable=g-import-not-at-top
    self._total, self._initial, self._last = int(total), int(initial), int(initial)
    self._log = logger or logging.getLogger("ddk_jax")
    self._bar = None
    self._start = time.monotonic()
    self._first: tuple[float, int] | None = None  # (time, step) of the first update
    use_bar = enabled and (bar if bar is not None else cli.stderr_is_tty())
    if use_bar:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
    self._lines = self._bar is None and cli.is_main_process()

  def eta_seconds(self, step: int, now: float | None = None) -> float | None:
    """Seconds left at `step`, from the pace since the first update (or since the start at the first)."""
    now = time.monotonic() if now is None else now
    if step >= self._total:
      return 0.0
    if self._first is not None and step > self._first[1]:
      t0, s0 = self._first
    else:
      t0, s0 = self._start, self._initial
    if step <= s0 or now <= t0:
      return None
    return (now - t0) / (step - s0) * (self._total - step)

  def format_line(self, step: int, *, loss: float, tok_s: float, mfu: float, now: float | None = None) -> str:
    from ddk_jax import cli  # pylint: disable=g-import-not-at-top
    now = time.monotonic() if now is None else now
    pct = 100 * step / self._total if self._total else 100.0
    parts = [f"step {step}/{self._total} ({pct:.0f}%)", f"loss {loss:.4f}", f"{tok_s:,.0f} tok/s",
             f"MFU {100 * mfu:.1f}%"]
    if step >= self._total:
      parts.append(f"done in {cli.format_duration(now - self._start)}")
    else:
      eta = self.eta_seconds(step, now)
      parts.append(f"ETA {cli.format_duration(eta)}" if eta is not None else "ETA ?")
    return " | ".join(parts)

  def update(self, step: int, *, loss: float, tok_s: float, mfu: float) -> None:
    now = time.monotonic()
    if self._bar is not None:
      self._bar.update(step - self._last)
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%", refresh=False)
    elif self._lines:
      self._log.info("%s", self.format_line(step, loss=loss, tok_s=tok_s, mfu=mfu, now=now))
    self._last = step
    if self._first is None:
      self._first = (now, step)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _ppl(loss: float) -> float:
  return math.exp(loss) if loss < 700 else math.inf


def format_domain_table(domains: Sequence[str], lS, lT, r) -> str:
  """Human-readable per-domain table: losses, their ratio, perplexities, weight.

  `lT` may be None (mode cpt): teacher columns then show '-'.
  """
  lS = np.asarray(lS, dtype=np.float64)
  r = np.asarray(r, dtype=np.float64)
  lT = None if lT is None else np.asarray(lT, dtype=np.float64)
  headers = ["domain", "student CE", "teacher CE", "lS/lT", "student ppl",
             "teacher ppl", "weight"]
  rows = []
  for i, d in enumerate(domains):
    if lT is None:
      t_ce = ratio = t_ppl = "-"
    else:
      t_ce = f"{lT[i]:.4f}"
      ratio = f"{lS[i] / lT[i]:.4f}"
      t_ppl = f"{_ppl(float(lT[i])):.2f}"
    rows.append([str(d), f"{lS[i]:.4f}", t_ce, ratio,
                 f"{_ppl(float(lS[i])):.2f}", t_ppl, f"{r[i]:.4f}"])
  widths = [max(len(h), *(len(row[k]) for row in rows))
            for k, h in enumerate(headers)]

  def line(cells):
    # domain left-aligned, numbers right-aligned
    return "  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                     for k, (c, w) in enumerate(zip(cells, widths)))

  out = [line(headers), "  ".join("-" * w for w in widths)]
  out += [line(row) for row in rows]
  return "\n".join(out)


def controller_table(controller: Any) -> str:
  """The table of the controller's last update: lS, cached lT, the weights it set."""
  last = controller.history[-1]
  names = controller.domains
  lT = None if last["teacher_loss"] is None else [last["teacher_loss"][d] for d in names]
  return format_domain_table(names, [last["student_loss"][d] for d in names], lT,
                             [last["weights"][d] for d in names])


def _plot_weights(history: list[dict], names: list[str], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = [h["step"] for h in history]
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, n in enumerate(names):
    ax.plot(steps, [h["weights"][i] if isinstance(h["weights"], list) else h["weights"][n] for h in history],
            marker="o", label=n)
  ax.set_xlabel("step")
  ax.set_ylabel("sampling weight r")
  ax.set_title("DDK domain weights")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with storage.open(path, "wb") as f:
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)


def _plot_perplexity(history: list[dict], names: list[str], teacher: list[float] | None, path: str, *,
                     signal: str = "validation") -> None:
  """The controller's student losses at each update as perplexities: validation losses, or
  with ddk.signal="train" the means over each interval's training batches."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = [h["step"] for h in history]
  fig, ax = plt.subplots(figsize=(7, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, n in enumerate(names):
    c = colors[i % len(colors)]
    ax.plot(steps, [float(np.exp(_loss(h["student_loss"], n, i))) for h in history], marker="o", color=c, label=n)
    if teacher is not None:
      ax.axhline(float(np.exp(teacher[i])), color=c, linestyle="--", linewidth=1)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  what = "training-batch" if signal == "train" else "validation"
  ax.set_ylabel(f"{what} perplexity (dashed: teacher)")
  ax.set_title(f"Student per-domain {what} perplexity at each DDK update")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  with storage.open(path, "wb") as f:
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)


def _loss(entry: Any, name: str, i: int) -> float:
  return float(entry[name] if isinstance(entry, dict) else entry[i])


def domain_table(names, before, after, teacher) -> str:
  lines = ["| domain | student before (ppl) | student after (ppl) | teacher (ppl) | after / teacher CE |",
           "|---|---:|---:|---:|---:|"]
  for i, n in enumerate(names):
    b = f"{np.exp(before[i]):.2f}" if before else "-"
    t = f"{np.exp(teacher[i]):.2f}" if teacher else "-"
    ratio = f"{after[i] / teacher[i]:.3f}" if teacher else "-"
    lines.append(f"| {n} | {b} | {np.exp(after[i]):.2f} | {t} | {ratio} |")
  if before:
    mean = lambda xs: float(np.mean(np.exp(xs)))
    lines.append(f"| **mean** | {mean(before):.2f} | {mean(after):.2f} | "
                 f"{mean(teacher) if teacher else float('nan'):.2f} | |")
  return "\n".join(lines)


def downstream_table(results: dict) -> str:
  """Downstream results ({task: {metric: value}}) as a markdown table: acc +- stderr, acc_norm,
  documents, and the mean accuracy over the tasks."""
  def num(m, key, fmt=".4f"):
    return format(m[key], fmt) if key in m else "-"

  lines = ["| task | acc | acc_norm | documents |", "|---|---:|---:|---:|"]
  for task, m in results.items():
    acc = num(m, "acc") + (f" ± {m['acc_stderr']:.4f}" if "acc_stderr" in m else "")
    lines.append(f"| {task} | {acc} | {num(m, 'acc_norm')} | {num(m, 'num_samples', '.0f')} |")
  accs = [m["acc"] for m in results.values() if "acc" in m]
  norms = [m["acc_norm"] for m in results.values() if "acc_norm" in m]
  if len(results) > 1 and accs:
    norm = f"{np.mean(norms):.4f}" if norms else "-"
    lines.append(f"| **mean** | {np.mean(accs):.4f} | {norm} | |")
  return "\n".join(lines)


def downstream_section(summary: dict) -> list[str]:
  """The report's lines on the downstream tasks (eval.tasks), or none."""
  results, settings = summary.get("downstream"), summary.get("downstream_settings") or {}
  if not results:
    return []
  limit = settings.get("limit") or 0
  docs = "every document" if not limit else f"at most {limit} documents"
  return ["## Downstream tasks", "",
          f"The student at step {settings.get('step')}: {docs} per task, {settings.get('num_fewshot', 0)}-shot "
          f"(eval.tasks; all task evaluations of the run took {settings.get('seconds', 0.0):.1f} s). acc is the "
          "share of items where the right choice has the highest log-likelihood (± its standard error); acc_norm "
          "divides each choice's log-likelihood by its length in bytes.", "",
          downstream_table(results), ""]


def _rows_text(per_domain: dict) -> str:
  return ", ".join(f"{n} {k}" for n, k in per_domain.items())


def rows_note(summary: dict) -> str:
  """Which validation rows the report's numbers were measured on (`summary["rows"]`)."""
  rows = summary.get("rows")
  if not rows:
    return ""
  final, controller = rows["final"], rows["controller"]
  whole = f"the whole validation split ({_rows_text(final['per_domain'])} rows of {rows['seq_len']} tokens)"
  if controller["per_domain"] == final["per_domain"]:
    return f"Validation rows: {whole}, for the DDK controller and for every number below."
  teacher = ", and the teacher (scored once on it at the end)" if summary.get("teacher_final") else ""
  n = controller["max_rows"]
  text = (f"Validation rows: the DDK controller scores the first {n} row{'s' if n != 1 else ''} per domain "
          f"(ddk.eval_max_rows; {_rows_text(controller['per_domain'])}). The numbers below use {whole}: the "
          f"student before training (scored once on it at step 0) and after training{teacher}.")
  if summary.get("student_initial") is None:
    text += (" This run's student was not scored on the whole split before training (it started with other "
             "validation settings), so 'before' is left out.")
  return text


def write_report(workdir: str, summary: dict, history: list[dict], settings: Any) -> str:
  names = summary["domains"]
  plots = []
  if history:
    _plot_weights(history, names, storage.join(workdir, "domain_weights.png"))
    _plot_perplexity(history, names, summary["teacher"], storage.join(workdir, "val_perplexity.png"),
                     signal=getattr(getattr(settings, "ddk", None), "signal", "validation"))
    plots = ["domain_weights.png", "val_perplexity.png"]
  wall = max(summary["wall_seconds"], 1e-9)
  controller = summary.get("controller_eval_seconds", summary["eval_seconds"])
  text = [
      f"# ddk_jax run report ({summary['mode']})",
      "",
      f"Steps: {summary['step']}, global batch {settings.global_batch_size} x {settings.seq_len} tokens, "
      f"DDK interval K={settings.ddk.interval}, alpha={settings.ddk.alpha}, gamma={settings.loss.gamma}, "
      f"T={settings.loss.temperature}.",
      f"Wall time {summary['wall_seconds']:.0f} s (this phase; compilation included), of which the DDK "
      f"controller's validation (teacher once, student at every update) {controller:.1f} s "
      f"({100 * controller / wall:.1f}%); all validation, the final one included, "
      f"{summary['eval_seconds']:.1f} s ({100 * summary['eval_seconds'] / wall:.1f}%).",
      "",
      "## Per-domain validation perplexity",
      "",
      *([rows_note(summary), ""] if summary.get("rows") else []),
      domain_table(names, summary["student_initial"], summary["student_final"],
                   summary.get("teacher_final", summary["teacher"])),
      "",
      "Final sampling weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, summary["weights"])),
      "",
      *downstream_section(summary),
  ]
  for p in plots:
    text += [f"![{p}]({p})", ""]
  path = storage.join(workdir, "report.md")
  storage.write_text(path, "\n".join(text))
  storage.write_text(storage.join(workdir, "summary.json"), json.dumps(summary, indent=1))
  return path
