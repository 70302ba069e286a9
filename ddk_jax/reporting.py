"""Run outputs: metrics (JSONL + TensorBoard), the progress bar, plots and report.md."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


class MetricsWriter:
  """Appends `{"step", "kind", ...}` rows to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._file = None
    self._tb = None
    if not enabled:
      return
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict[str, float], kind: str) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
    row.update({k: float(v) for k, v in values.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k if "/" in k else f"{kind}/{k}", float(v), int(step))

  def close(self) -> None:
    if self._file:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """tqdm bar with loss, tokens/s, MFU and ETA (tqdm's own); a no-op when disabled."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
    self._last = initial

  def update(self, step: int, *, loss: float, tok_s: float, mfu: float) -> None:
    if self._bar is None:
      return
    self._bar.update(step - self._last)
    self._last = step
    self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%", refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


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
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_perplexity(history: list[dict], names: list[str], teacher: list[float] | None, path: str) -> None:
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
  ax.set_ylabel("validation perplexity (dashed: teacher)")
  ax.set_title("Student per-domain validation perplexity")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
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


def write_report(workdir: str, summary: dict, history: list[dict], cfg: Any) -> str:
  names = summary["domains"]
  plots = []
  if history:
    _plot_weights(history, names, os.path.join(workdir, "domain_weights.png"))
    _plot_perplexity(history, names, summary["teacher"], os.path.join(workdir, "val_perplexity.png"))
    plots = ["domain_weights.png", "val_perplexity.png"]
  wall = max(summary["wall_seconds"], 1e-9)
  controller = summary.get("controller_eval_seconds", summary["eval_seconds"])
  text = [
      f"# ddk_jax run report ({summary['mode']})",
      "",
      f"Steps: {summary['step']}, global batch {cfg.global_batch_size} x {cfg.data.seq_len} tokens, "
      f"DDK interval K={cfg.ddk.interval}, alpha={cfg.ddk.alpha}, gamma={cfg.loss.gamma}, T={cfg.loss.temperature}.",
      f"Wall time {summary['wall_seconds']:.0f} s (this phase; compilation included), of which the DDK "
      f"controller's validation (teacher once, student at every update) {controller:.1f} s "
      f"({100 * controller / wall:.1f}%); all validation, the final one included, "
      f"{summary['eval_seconds']:.1f} s ({100 * summary['eval_seconds'] / wall:.1f}%).",
      "",
      "## Per-domain validation perplexity",
      "",
      domain_table(names, summary["student_initial"], summary["student_final"], summary["teacher"]),
      "",
      "Final sampling weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, summary["weights"])),
      "",
  ]
  for p in plots:
    text += [f"![{p}]({p})", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(text))
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return path
