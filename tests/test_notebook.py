"""notebooks/colab_tpu_demo.ipynb executed headless on CPU at its tiny size (DDK_NOTEBOOK_TINY=1).

The whole notebook runs: install (a no-op here: ddk_jax is installed), the device probe,
the demo through the CLI (corpus, tokenizer, teacher and student pre-training, DDK),
report table and plots, HF export, transformers generation. About 1.5 minutes on the
2-core development machine, nearly all of it XLA compilation in the CLI.
"""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "colab_tpu_demo.ipynb")


def _text(cell) -> str:
  parts = []
  for out in cell.get("outputs", []):
    if out.get("output_type") == "stream":
      parts.append(out["text"])
    elif "data" in out:
      parts.append(out["data"].get("text/markdown", "") or out["data"].get("text/plain", ""))
    elif out.get("output_type") == "error":
      parts.append("\n".join(out.get("traceback", [])))
  return "".join(parts)


def test_parameters_cell_is_tagged_and_outputs_are_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1 and "DDK_NOTEBOOK_TINY" in tagged[0].source
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"


def test_notebook_runs_end_to_end_at_tiny_size(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  root = tmp_path / "runs"
  env_before = {k: os.environ.get(k) for k in ("DDK_NOTEBOOK_TINY", "DDK_NOTEBOOK_ROOT")}
  os.environ["DDK_NOTEBOOK_TINY"] = "1"  # the kernel (and the CLI it starts) inherit the environment
  os.environ["DDK_NOTEBOOK_ROOT"] = str(root)
  try:
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
    client.execute()
  finally:
    for k, v in env_before.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  code = [c for c in nb.cells if c.cell_type == "code"]
  text = "\n".join(_text(c) for c in code)
  assert "ddk_jax is already installed: skipping pip" in text
  assert "jax.devices(): [CpuDevice(id=0)" in text and "'tiny' settings" in text

  workdir = root / "demo_ddk_tiny"
  assert (workdir / "report.md").is_file()
  assert "DDK update at step" in text and "Done. Report:" in text
  # The domain table and both plots were displayed inline.
  results = next(c for c in code if "report.md" in c.source)
  images = [o for o in results.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2, [o.get("output_type") for o in results.outputs]
  table = _text(results)
  for domain in ("records", "math", "code", "docstrings", "prose"):
    assert f"| {domain} |" in table
  assert "Final sampling weights" in table

  # The export loads in transformers and generated tokens.
  hf = root / "hf_demo_ddk_tiny"
  assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
  assert "loaded LlamaForCausalLM" in text and "generated: '" in text and "logits (1, " in text
