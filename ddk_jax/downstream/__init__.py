"""Downstream evaluation with lm-evaluation-harness (`pip install 'ddk_jax[eval]'`).

* `DDKJaxLM` (`adapter.py`): the lm-eval model `ddk_jax` over our Flax model, built from
  params + ModelConfig + tokenizer, a run's student (`from_run`) or an HF dir (`from_hf`).
* `run_tasks(model, tasks, *, limit=None, num_fewshot=0)` (`harness.py`): lm-eval tasks
  by name, results as `{task: {metric: value}}`.
* `local_tasks.py`: the multiple-choice tasks built from the demo corpus's validation
  documents (`python -m ddk_jax.downstream.local_tasks --out DIR`).

See docs/downstream.md.  `local_tasks`, `packing` and `scorer` work without lm-eval.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DDKJaxLM", "run_tasks"]

_INSTALL_HINT = ("downstream evaluation needs lm-evaluation-harness: pip install 'ddk_jax[eval]' "
                 "(or pip install 'lm-eval>=0.4.13')")


def __getattr__(name: str) -> Any:
  if name not in __all__:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  try:
    if name == "DDKJaxLM":
      from ddk_jax.downstream.adapter import DDKJaxLM as obj
    else:
      from ddk_jax.downstream.harness import run_tasks as obj
  except ModuleNotFoundError as e:
    if e.name and e.name.split(".")[0] == "lm_eval":
      raise ImportError(_INSTALL_HINT) from e
    raise
  return obj
