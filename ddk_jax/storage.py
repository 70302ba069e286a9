"""Where run outputs go: a local directory or an object store URL (gs://bucket/run).

This module is the one place that tells local paths from URLs.  Local paths behave exactly
as plain Python file calls would (same files, same bytes); URLs go through fsspec (gcsfs
for gs://, installed by the `tpu` and `gpu` extras).

Object stores differ from a disk in ways this module hides or makes explicit:

* there are no directories: `makedirs` is a no-op and a "directory" exists once an object
  lies under it;
* objects cannot be appended to or truncated: `AppendLog` (metrics.jsonl) keeps the file's
  content in memory and uploads the whole object on `flush_remote()` / `close()`;
* an object appears whole when its upload ends, so `write_bytes_atomic` is one upload;
* libraries that only write to local disk write into a `LocalMirror`, whose files are
  uploaded on `sync()` / `close()`.

    run = storage.resolve(workdir)                   # abspath locally, unchanged for gs://
    storage.check_writable(run)                      # StorageError naming the path and the fix
    storage.write_text(storage.join(run, "report.md"), text)
    with storage.AppendLog(storage.join(run, "metrics.jsonl")) as log:
      log.write(json.dumps(row) + "\\n"); log.flush()
"""

from __future__ import annotations

import builtins
import errno
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from typing import IO, Any

__all__ = [
    "AppendLog", "LocalMirror", "StorageError", "check_writable", "exists", "getsize", "is_remote", "isdir",
    "join", "listdir", "makedirs", "move_dir", "open", "read_bytes", "read_text", "remove", "require_local",
    "resolve", "truncate", "upload_dir", "upload_file", "write_bytes", "write_bytes_atomic", "write_text",
]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_INSTALL_HINT = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


class StorageError(OSError):
  """A run directory that cannot be used; the message names the path and what to do."""


# ---- paths -------------------------------------------------------------------------------


def _scheme(path: str) -> str | None:
  m = _URL.match(path)
  return m.group(1).lower() if m else None


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs such as gs://bucket/dir (file:// and plain paths are local)."""
  scheme = _scheme(os.fspath(path))
  return scheme is not None and scheme != "file"


def resolve(path: str | os.PathLike) -> str:
  """The canonical form of a run path: absolute with ~ expanded locally; a URL keeps its
  form, without a trailing '/'.  Raises ValueError for a URL without a bucket."""
  path = os.fspath(path)
  scheme = _scheme(path)
  if scheme == "file":
    path = path[len("file://"):]
  elif scheme is not None:
    rest = path[len(scheme) + 3:]
    if not rest.strip("/"):
      raise ValueError(f"{path!r} names no bucket; write {scheme}://BUCKET/DIR.")
    return f"{scheme}://{rest.rstrip('/')}"
  return os.path.abspath(os.path.expanduser(path))


def require_local(path: str | os.PathLike, what: str, fix: str) -> str:
  """`path` if it is local; otherwise ValueError "<what>=<path> must be a local path; <fix>"
  (for settings whose readers only take local files, checked before any work)."""
  path = os.fspath(path)
  if is_remote(path):
    raise ValueError(f"{what}={path} must be a local path; {fix}")
  return path


def join(a: str | os.PathLike, *parts: str) -> str:
  """os.path.join for local paths; '/'-joined for URLs (a part may not start with '/')."""
  a = os.fspath(a)
  if not is_remote(a):
    return os.path.join(a, *parts)
  out = a.rstrip("/")
  for p in parts:
    p = os.fspath(p)
    if p.startswith("/"):
      raise ValueError(f"join({a!r}, ..., {p!r}): an absolute part would leave the bucket")
    if p:
      out = f"{out}/{p.rstrip('/')}" if out else p
  return out


# ---- the remote file system --------------------------------------------------------------


def _fs(path: str):
  """(fsspec file system, path in its terms).  Listings are not cached: other writers
  (orbax through tensorstore, other hosts) change directories behind our back."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    return fsspec.core.url_to_fs(path, use_listings_cache=False)
  except ImportError as e:
    pkg = _INSTALL_HINT.get(_scheme(path) or "", "the fsspec driver for this URL")
    raise StorageError(f"{path}: reading or writing {_scheme(path)}:// paths needs {pkg}; "
                       f"pip install {pkg} (the ddk_jax[tpu] and [gpu] extras include gcsfs). ({e})") from e


def _not_found(path: str) -> FileNotFoundError:
  return FileNotFoundError(errno.ENOENT, "No such file or directory", path)


# ---- file operations ---------------------------------------------------------------------


def makedirs(path: str | os.PathLike) -> None:
  """os.makedirs(exist_ok=True) locally; nothing for object stores (no directories)."""
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def exists(path: str | os.PathLike) -> bool:
  """A file or directory (for URLs: an object, or a prefix some object lies under)."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return fs.exists(p)


def isdir(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return fs.isdir(p)


def listdir(path: str | os.PathLike) -> list[str]:
  """Sorted names of the entries directly under `path` (FileNotFoundError if none)."""
  path = os.fspath(path)
  if not is_remote(path):
    return sorted(os.listdir(path))
  fs, p = _fs(path)
  if not fs.isdir(p):
    raise _not_found(path)
  return sorted({posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False)} - {""})


def getsize(path: str | os.PathLike) -> int:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.getsize(path)
  fs, p = _fs(path)
  try:
    return int(fs.size(p))
  except FileNotFoundError:
    raise _not_found(path) from None


def remove(path: str | os.PathLike) -> None:
  """Deletes one file (FileNotFoundError if there is none), like os.remove."""
  path = os.fspath(path)
  if not is_remote(path):
    os.remove(path)
    return
  fs, p = _fs(path)
  if not fs.isfile(p):
    raise _not_found(path)
  fs.rm_file(p)


def open(path: str | os.PathLike, mode: str = "r", encoding: str = "utf-8") -> IO[Any]:  # noqa: A001
  """builtins.open locally (text modes use `encoding`); for URLs, 'r'/'w' modes only: an
  object cannot be appended to (use AppendLog) and appears when the file is closed."""
  path = os.fspath(path)
  text = "b" not in mode
  if not is_remote(path):
    return builtins.open(path, mode, encoding=encoding) if text else builtins.open(path, mode)
  if "a" in mode or "+" in mode or "x" in mode:
    raise ValueError(f"open({path!r}, {mode!r}): objects in {_scheme(path)}:// cannot be appended to or "
                     "updated in place; write the whole object (mode 'w'/'wb'), or use storage.AppendLog.")
  fs, p = _fs(path)
  return fs.open(p, mode, encoding=encoding) if text else fs.open(p, mode)


def read_bytes(path: str | os.PathLike) -> bytes:
  path = os.fspath(path)
  if not is_remote(path):
    with builtins.open(path, "rb") as f:
      return f.read()
  fs, p = _fs(path)
  try:
    return fs.cat_file(p)
  except FileNotFoundError:
    raise _not_found(path) from None


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes the whole file (one upload for URLs, which is atomic there)."""
  path = os.fspath(path)
  if not is_remote(path):
    with builtins.open(path, "wb") as f:
      f.write(data)
    return
  fs, p = _fs(path)
  fs.pipe_file(p, bytes(data))


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  """Like `open(path, "w").write(text)` locally (no newline translation on POSIX)."""
  path = os.fspath(path)
  if not is_remote(path):
    with builtins.open(path, "w", encoding=encoding) as f:
      f.write(text)
    return
  write_bytes(path, text.encode(encoding))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Readers see the old file or the new one, never a part: locally a temporary file in
  the same directory, fsync'ed, then renamed over `path`; for URLs one upload."""
  path = os.fspath(path)
  if is_remote(path):
    write_bytes(path, data)
    return
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with builtins.open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def truncate(path: str | os.PathLike, size: int) -> None:
  """os.truncate; for URLs the object is rewritten with its first `size` bytes."""
  path = os.fspath(path)
  if not is_remote(path):
    os.truncate(path, size)
    return
  data = read_bytes(path)
  if size > len(data):
    data = data + b"\0" * (size - len(data))  # as os.truncate extends a file
  write_bytes(path, data[:size])


def upload_file(local: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Copies a local file to `dest` (a URL, or a local path: then a plain copy)."""
  local, dest = os.fspath(local), os.fspath(dest)
  if not is_remote(dest):
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    shutil.copyfile(local, dest)
    return
  fs, p = _fs(dest)
  fs.put_file(local, p)


def upload_dir(local: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
  """Copies every file under directory `local` to the same relative path under `dest`;
  returns the relative paths copied ('/'-separated, sorted)."""
  local, dest = os.fspath(local), os.fspath(dest)
  copied = []
  for root, _, files in os.walk(local):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
      upload_file(os.path.join(root, name), join(dest, rel))
      copied.append(rel)
  return sorted(copied)


def move_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Renames a directory locally; on an object store copies every object under `src` to
  the same relative name under `dest`, then deletes `src` (there is no rename there)."""
  src, dest = os.fspath(src), os.fspath(dest)
  if not is_remote(src):
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    os.rename(src, dest)
    return
  fs, root = _fs(src)
  _, dest_root = _fs(dest)
  for name in fs.find(root):
    fs.copy(name, dest_root.rstrip("/") + "/" + name[len(root):].lstrip("/"))
  fs.rm(root, recursive=True)
  # Other instances of this file system (etils.epath's, which orbax uses) cache listings
  # that still show `src`.
  for instance in list(getattr(type(fs), "_cache", {}).values()):
    instance.invalidate_cache()


def check_writable(directory: str | os.PathLike) -> str:
  """Creates `directory` if needed and proves that a file can be written and deleted in it;
  returns its resolved form.  Raises StorageError naming the path and the fix."""
  directory = resolve(directory)
  probe = join(directory, f".write_test_{os.getpid()}_{uuid.uuid4().hex[:8]}")
  try:
    makedirs(directory)
    write_text(probe, "ok")
    remove(probe)
  except StorageError:
    raise
  except Exception as e:  # noqa: BLE001 - fsspec drivers raise their own types
    reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
    if is_remote(directory):
      bucket = directory.split("://", 1)[1].split("/", 1)[0]
      fix = (f"check that bucket {bucket!r} exists and that this machine's credentials may create and delete "
             "objects in it (on a Cloud TPU VM: the VM's service account needs roles/storage.objectAdmin on "
             "the bucket; elsewhere: gcloud auth application-default login), or pass --workdir= another "
             "location.")
    else:
      fix = "pass --workdir= a directory you can write to."
    err = StorageError(f"workdir {directory!r} is not writable ({reason}); {fix}")
    err.errno = getattr(e, "errno", None) or errno.EACCES  # str(err) stays the message alone
    raise err from e
  return directory


# ---- append-only logs --------------------------------------------------------------------


class AppendLog:
  """An append-only text file such as metrics.jsonl.

  Locally it is the file opened in append mode: `write` + `flush` behave exactly as they
  would on that file.  For URLs the whole content is held in memory (the existing object
  is read when the log opens) and uploaded as one object by `flush_remote()`, by `flush()`
  when `upload_every_s` has passed since the last upload, and by `close()`.  Only one
  process may write a given log.

  `size()` is the length the file has (or will have once uploaded); call `flush_remote()`
  before recording it next to a checkpoint, so that the stored object is at least that long.
  """

  def __init__(self, path: str | os.PathLike, *, upload_every_s: float = 60.0):
    self.path = os.fspath(path)
    self.remote = is_remote(self.path)
    self.upload_every_s = float(upload_every_s)
    self._file = None
    self._buf = bytearray()
    self._dirty = False
    self._last_upload = time.monotonic()
    self._closed = False
    if self.remote:
      if exists(self.path):
        self._buf += read_bytes(self.path)
    else:
      self._file = builtins.open(self.path, "a", encoding="utf-8")

  @property
  def closed(self) -> bool:
    return self._closed

  def write(self, text: str) -> None:
    self._check_open()
    if self._file is not None:
      self._file.write(text)
    else:
      self._buf += text.encode("utf-8")
      self._dirty = True

  def flush(self) -> None:
    """Local: flushes the file.  URL: uploads if `upload_every_s` has passed since the last upload."""
    self._check_open()
    if self._file is not None:
      self._file.flush()
    elif self._dirty and time.monotonic() - self._last_upload >= self.upload_every_s:
      self.flush_remote()

  def flush_remote(self) -> None:
    """Makes the stored file hold everything written so far (local: a flush)."""
    self._check_open()
    if self._file is not None:
      self._file.flush()
    elif self._dirty:
      write_bytes(self.path, bytes(self._buf))
      self._dirty = False
      self._last_upload = time.monotonic()

  def size(self) -> int:
    self._check_open()
    if self._file is not None:
      self._file.flush()
      return os.fstat(self._file.fileno()).st_size
    return len(self._buf)

  def truncate(self, size: int) -> int:
    """Drops everything after byte `size` (stored at once); returns the bytes dropped
    (0 when the log is not longer than `size`: it is never extended)."""
    self._check_open()
    current = self.size()
    if current <= size:
      return 0
    if self._file is not None:
      os.truncate(self.path, size)  # O_APPEND: the next write lands at the new end
    else:
      del self._buf[size:]
      self._dirty = True
      self.flush_remote()
    return current - size

  def close(self) -> None:
    if self._closed:
      return
    try:
      if self._file is not None:
        self._file.close()
      elif self._dirty:
        write_bytes(self.path, bytes(self._buf))
        self._dirty = False
    finally:
      self._file = None
      self._closed = True

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"{self.path}: the log is closed")

  def __enter__(self) -> AppendLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---- local copies of remote directories ----------------------------------------------------


class LocalMirror:
  """A local directory for libraries that only write to local disk (plots, event files),
  copied to `target` by `sync()` and `close()`.

  For a local `target` the mirror is `target` itself (`local == target`, nothing is
  copied, nothing is created).  For a URL it is a fresh temporary directory; `sync()`
  uploads the files that are new or changed since the last sync, and `close()` syncs and
  deletes the temporary directory.  Files already under `target` are not downloaded.
  """

  def __init__(self, target: str | os.PathLike, *, prefix: str = "ddk_jax_mirror_"):
    self.target = resolve(target)
    self.remote = is_remote(self.target)
    self.local = tempfile.mkdtemp(prefix=prefix) if self.remote else self.target
    self._sent: dict[str, tuple[int, int]] = {}
    self._closed = False

  def sync(self) -> list[str]:
    """Uploads new or changed files; returns their relative paths ('/'-separated, sorted)."""
    if not self.remote or self._closed:
      return []
    sent = []
    for root, _, files in os.walk(self.local):
      for name in files:
        src = os.path.join(root, name)
        rel = os.path.relpath(src, self.local).replace(os.sep, "/")
        st = os.stat(src)
        stamp = (st.st_size, st.st_mtime_ns)
        if self._sent.get(rel) != stamp:
          upload_file(src, join(self.target, rel))
          self._sent[rel] = stamp
          sent.append(rel)
    return sorted(sent)

  def close(self) -> None:
    if self._closed:
      return
    try:
      self.sync()
    finally:
      self._closed = True
      if self.remote:
        shutil.rmtree(self.local, ignore_errors=True)

  def __enter__(self) -> LocalMirror:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
