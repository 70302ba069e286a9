"""The embedded demo: a generated 5-domain corpus (`ddk_jax.demo.corpus`) for configs/demo.py."""
