"""Test session set-up: an emulated 8-device CPU mesh (DDK_TEST_NUM_DEVICES overrides).

Set before JAX runs anything, so every test sees the same devices.  Tests that compare
one device with a mesh take `jax.devices()[:1]` for the single-device side.
"""

import os
import sys

# Test helpers (tiny_run.py) live beside the tests.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny models: XLA's compile time dominates, and the cheaper CPU backend
# pipeline halves it without changing what is computed.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ.get("DDK_TEST_NUM_DEVICES", "8")))

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "devices(n): the test lays arrays out over n emulated devices")


def pytest_collection_modifyitems(config, items):
  # The suite's default session has 8 emulated devices; with DDK_TEST_NUM_DEVICES=1 the tests
  # whose point is a multi-device layout (2x2x2 meshes, sharded placement) cannot run.
  have = jax.device_count()
  for item in items:
    mark = item.get_closest_marker("devices")
    if mark is not None and have < mark.args[0]:
      item.add_marker(pytest.mark.skip(reason=f"lays arrays out over {mark.args[0]} devices; this session has "
                                              f"{have} (DDK_TEST_NUM_DEVICES)"))


pytest_plugins = ["gcs_emulator"]  # gcs_emulator / gcs_bucket / gcs_dir fixtures: a local GCS (tests/gcs_emulator.py)
