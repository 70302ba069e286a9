"""`python -m ddk_jax.downstream run --model ddk_jax --model_args pretrained=HF_DIR ...`: lm-eval's
own command line, with the `ddk_jax` model registered (see docs/downstream.md)."""

from lm_eval.__main__ import cli_evaluate

from ddk_jax.downstream import adapter  # noqa: F401  (registers the ddk_jax model)

if __name__ == "__main__":
  cli_evaluate()
