"""`python -m ddk_jax.data.demo_corpus` still works; the demo corpus lives in ddk_jax.demo.corpus."""

from ddk_jax.demo.corpus import main

if __name__ == "__main__":
  main()
