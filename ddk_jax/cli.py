"""What every command-line entry point shares: logging, progress output, and argument errors.

`run(main, prog=...)` replaces `absl.app.run`: a bad command line (an unknown or
misspelled config key, a value of the wrong type, a config file that is missing, does not
parse or raises, a missing required flag) prints one or two lines naming the key or file
and the fix, and exits with status 2 instead of a traceback.  `fail(message)` does the
same from inside `main`.

`setup_logging()` routes log records through `tqdm.write` while a progress bar is open,
so bars and log lines never share a line.  `TransferProgress` reports a long job over
many items (tensors of a checkpoint): a tqdm bar on an interactive terminal, else a log
line every ~10% of the bytes (or every N items).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, NoReturn, Sequence

EXIT_USAGE = 2
CONFIG_DOCS = "docs/config.md"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


# ------------------------------------------------------------------------------ errors


class UsageError(Exception):
  """A bad command line or input file: its message is printed (no traceback) and the exit status is 2."""


def require_config(argv: list[str], cfg, purpose: str):
  """The parsed --config of an entry point that takes no positional arguments; UsageError
  (one line, exit 2) for stray arguments or a missing --config, naming what the file is for."""
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {' '.join(argv[1:])}; config overrides are written "
                     "--config.<key>=<value> (keys: docs/config.md); see --help for the flags.")
  if cfg is None:
    raise UsageError(f"--config is required: {purpose}, e.g. --config=configs/demo.py (keys: docs/config.md).")
  return cfg


def fail(message: str, prog: str | None = None) -> NoReturn:
  """Prints `prog: error: message` to stderr and exits with status 2."""
  prog = prog or _PROG[0] or os.path.basename(sys.argv[0] or "ddk_jax")
  sys.stderr.write(f"{prog}: error: {message.rstrip()}\n")
  sys.stderr.flush()
  sys.exit(EXIT_USAGE)


_PROG: list[str | None] = [None]


def run(main: Callable[[list[str]], Any], *, prog: str, config_flag: str | None = "config",
        argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)` with command-line errors as one or two lines and exit status 2.

  Args:
    main: called with the arguments left after flag parsing; `UsageError` (ours or absl's)
      raised from it is printed like a flag error.
    prog: the name errors start with, e.g. "ddk_jax.main".
    config_flag: name of the `config_flags.DEFINE_config_file` flag, if the program has one;
      its file is then checked (exists, parses, has get_config) and its override keys
      (`--config.<key>=...`) looked up, with a close-match suggestion for a misspelled key.
  """
  from absl import app

  _PROG[0] = prog

  def parser(args: list[str]) -> list[str]:
    return parse_flags(args, config_flag=config_flag)

  def guarded_main(args: list[str]) -> Any:
    try:
      return main(args)
    except (UsageError, app.UsageError) as e:
      fail(str(e))

  app.run(guarded_main, argv=list(argv) if argv is not None else None, flags_parser=parser)


def parse_flags(argv: list[str], *, config_flag: str | None = "config") -> list[str]:
  """Parses `argv` into absl's FLAGS; on any error prints a short diagnosis and exits with 2."""
  from absl import flags

  fv = flags.FLAGS
  if config_flag is not None and config_flag not in fv:
    config_flag = None
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # ml_collections' own warnings would repeat what we report
  try:
    rest = fv(argv)
  except Exception as e:  # noqa: BLE001 - flag errors, and whatever a config file raises while loading
    fail(diagnose(argv, e, config_flag))
  finally:
    absl_log.setLevel(level)
  if config_flag is not None and _config_path(argv, config_flag) is not None:
    value = fv[config_flag].value
    # A config file that failed with an OSError is only reported by ml_collections on first
    # access; one whose get_config() returned None is accepted silently.
    if value is None or type(value).__name__ == "_ErrorConfig":
      fail(diagnose(argv, None, config_flag))
  return rest


def diagnose(argv: Sequence[str], error: BaseException | None, config_flag: str | None) -> str:
  """The message for a command line that failed to parse with `error`."""
  if config_flag is not None:
    path = _config_path(argv, config_flag)
    overrides = _overrides(argv, config_flag)
    if path is None and overrides:
      first = overrides[0][0]
      return (f"--{config_flag}.{first} needs a config file to override: pass --{config_flag}=FILE "
              f"(e.g. configs/demo.py) before it.")
    if path is not None:
      cfg, problem = load_config_file(path, config_flag)
      if problem:
        return problem
      for key, value in overrides:
        problem = check_override(cfg, key, value, config_flag)
        if problem:
          return problem
      if error is not None:
        problem = _bad_override_value(cfg, error, config_flag)
        if problem:
          return problem
  if error is None:
    return "could not read the command line."
  return _flag_error_message(error)


def _config_path(argv: Sequence[str], config_flag: str) -> str | None:
  """The value of --<config_flag> in argv (the last one wins, as in absl)."""
  found = None
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    m = re.match(rf"^--?{re.escape(config_flag)}(=(.*))?$", arg)
    if m:
      if m.group(1) is not None:
        found = m.group(2)
      elif i + 1 < len(args):
        found = args[i + 1]
  return found


def _overrides(argv: Sequence[str], config_flag: str) -> list[tuple[str, str | None]]:
  """(key, value or None) of every --<config_flag>.<key>[=value] in argv."""
  out = []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    m = re.match(rf"^--?(?:no)?{re.escape(config_flag)}\.([^=]+)(=(.*))?$", arg)
    if m:
      value = m.group(3)
      if value is None and i + 1 < len(args) and not args[i + 1].startswith("-"):
        value = args[i + 1]
      out.append((m.group(1), value))
  return out


def _innermost_line(error: BaseException, path: str) -> int | None:
  """The line of `path` where `error` was raised from (innermost frame in that file)."""
  target = os.path.abspath(path)
  line = None
  for frame in traceback.extract_tb(error.__traceback__):
    if os.path.abspath(frame.filename) == target:
      line = frame.lineno
  return line


def load_config_file(spec: str, config_flag: str = "config") -> tuple[Any, str | None]:
  """(config, None) or (None, message) for `--config=spec` (`path` or `path:argument`)."""
  path, _, arg = spec.partition(":")
  fix = f"pass an existing experiment file, e.g. --{config_flag}=configs/demo.py"
  if not path:
    return None, f"--{config_flag} is empty; {fix}."
  if not os.path.exists(path):
    where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    return None, f"config file {path} does not exist{where}; {fix}."
  if os.path.isdir(path):
    return None, f"config file {path} is a directory; {fix}."
  name = "_ddk_jax_config_check"
  try:
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
      return None, f"config file {path} is not a Python file; {fix}."
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up while they run
    try:
      module_spec.loader.exec_module(module)
    finally:
      sys.modules.pop(name, None)
  except SyntaxError as e:
    where = f"{path}, line {e.lineno}" if e.lineno else path
    text = (e.text or "").strip()
    return None, (f"config file {where}: {e.msg}" + (f": {text}" if text else "")
                  + ". Fix the file's Python syntax.")
  except Exception as e:  # noqa: BLE001 - anything the file itself raises
    line = _innermost_line(e, path)
    return None, (f"config file {path}{f' (line {line})' if line else ''} raised {type(e).__name__} while "
                  f"loading: {_first_line(e)}. Fix the file or what it imports.")
  if not callable(getattr(module, "get_config", None)):
    return None, (f"config file {path} has no get_config() function; an experiment file defines get_config() "
                  f"returning a ConfigDict (see {CONFIG_DOCS} and configs/demo.py).")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001
    line = _innermost_line(e, path)
    return None, (f"config file {path}: get_config() raised {type(e).__name__}{f' at line {line}' if line else ''}: "
                  f"{_first_line(e).rstrip('.')}. Fix the file or what it reads.")
  if cfg is None:
    return None, f"config file {path}: get_config() returned None; it must return the ConfigDict (missing return?)."
  return cfg, None


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
  """Every key of a (nested) ConfigDict, sections included, as dotted paths."""
  out = []
  try:
    items = list(cfg.items())
  except AttributeError:
    return out
  for k, v in items:
    key = f"{prefix}{k}"
    out.append(key)
    if hasattr(v, "items") and not isinstance(v, (str, bytes)):
      out += flat_keys(v, key + ".")
  return out


def check_override(cfg: Any, key: str, value: str | None, config_flag: str = "config") -> str | None:
  """A message if `key` is not a key of `cfg` (with the closest existing key), else None."""
  if "[" in key or "(" in key:  # list elements (`a.b[0].c`): left to ml_collections
    return None
  node = cfg
  parts = key.split(".")
  for i, part in enumerate(parts):
    is_mapping = hasattr(node, "items") and hasattr(node, "keys")
    if not is_mapping or part not in node.keys():
      break
    node = node[part]
  else:
    return None
  shown = f"--{config_flag}.{key}" + (f"={value}" if value is not None else "")
  keys = flat_keys(cfg)
  if not is_mapping:
    parent = ".".join(parts[:i])
    return (f"{shown}: config key '{parent}' is a value ({type(node).__name__}), not a section; "
            f"set it with --{config_flag}.{parent}=... (keys are documented in {CONFIG_DOCS}).")
  match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  if not match and i:  # a misspelled leaf in an existing section: compare the leaf names there
    parent = ".".join(parts[:i])
    leaf = difflib.get_close_matches(parts[i], [str(k) for k in node.keys()], n=1, cutoff=0.6)
    match = [f"{parent}.{leaf[0]}"] if leaf else []
  suggestion = f"; did you mean --{config_flag}.{match[0]}?" if match else "."
  return f"{shown}: unknown config key '{key}'{suggestion} Config keys are documented in {CONFIG_DOCS}."


def _bad_override_value(cfg: Any, error: BaseException, config_flag: str) -> str | None:
  """A message for `--config.<key>=<value>` whose value does not parse as the key's type."""
  text = str(error)
  m = re.match(rf"^flag --{re.escape(config_flag)}\.([^=\s]+)=(.*?): (.*)$", text.splitlines()[0] if text else "")
  if not m:
    return None
  key, value, reason = m.groups()
  node = cfg
  try:
    for part in key.split("."):
      node = node[part]
  except Exception:  # noqa: BLE001
    return f"--{config_flag}.{key}={value}: {reason}."
  kind = type(node).__name__
  if isinstance(node, bool):
    reason = "use true or false"
  return (f"--{config_flag}.{key}={value}: not a valid {kind} ({reason}); config key '{key}' takes a {kind} "
          f"(the config file sets {node!r}), see {CONFIG_DOCS}.")


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError('x') prints 'x'
    text = text[1:-1]
  first = text.splitlines()[0] if text else type(error).__name__
  return first[:300]


def _flag_error_message(error: BaseException) -> str:
  text = str(error)
  m = re.search(r"Flag --([\w.]+) must have a value other than None", text)
  if m:
    name = m.group(1)
    help_text = ""
    try:
      from absl import flags
      help_text = flags.FLAGS[name].help or ""
    except Exception:  # noqa: BLE001
      pass
    return f"--{name} is required" + (f": {help_text.rstrip('.')}." if help_text else ".")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if not lines:
    return f"{type(error).__name__} while reading the command line."
  msg = lines[0]
  if msg.startswith(("flag --", "Flag --")):  # absl's "flag --step=abc: invalid literal ..."
    msg = msg[len("flag "):]
  if len(lines) > 1 and "Traceback" not in lines[1] and len(lines[1]) < 200:
    msg += " " + lines[1]
  if type(error).__name__ == "FlagOrderError" and "before a value for" in msg:
    msg = msg.rstrip(".") + "; put the config file flag before its overrides."
  if type(error).__name__ == "UnrecognizedFlagError":
    msg = re.sub(r"\.?\s*Did you mean: ([\w,\s]+?)\s*\?", lambda m: f"; did you mean --{m.group(1).strip()}?", msg)
    msg = msg.rstrip(".") + ("" if msg.endswith("?") else ".") + " See --help for the flags."
  return msg[:500]


# ----------------------------------------------------------------------------- logging


class TqdmAwareHandler(logging.StreamHandler):
  """A stream handler that writes through `tqdm.write` while a tqdm bar is open, so a log
  record never lands in the middle of a bar's line."""

  def emit(self, record: logging.LogRecord) -> None:
    if not bars_open():
      super().emit(record)
      return
    try:
      from tqdm import tqdm
      tqdm.write(self.format(record), file=self.stream)
      self.flush()
    except Exception:  # noqa: BLE001 - logging must not raise
      self.handleError(record)


def bars_open() -> bool:
  """Whether a tqdm bar is currently open in this process."""
  std = sys.modules.get("tqdm.std")
  if std is None:  # tqdm never imported: no bar can be open
    return False
  return any(True for _ in std.tqdm._instances)  # pylint: disable=protected-access


def setup_logging(level: int = logging.INFO) -> None:
  """INFO logs to stderr (`HH:MM:SS LEVEL message`), written around open progress bars."""
  root = logging.getLogger()
  for h in list(root.handlers):
    root.removeHandler(h)
    h.close()
  handler = TqdmAwareHandler(sys.stderr)
  handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
  root.addHandler(handler)
  root.setLevel(level)
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------- progress


def stderr_is_tty() -> bool:
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):
    return False


def is_main_process() -> bool:
  jax = sys.modules.get("jax")
  if jax is None:
    return True
  try:
    return jax.process_index() == 0
  except Exception:  # noqa: BLE001 - before the backend exists
    return True


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f"{h}h{m:02d}m"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


class TransferProgress:
  """Progress of a job over `total` items holding `total_bytes` bytes (e.g. the tensors of a
  checkpoint being read or written).

  On process 0 only: a tqdm bar of bytes, with items done/total, when `progress` is True,
  or when it is None and stderr is a terminal; otherwise a log line (logger `logger`,
  INFO) each time another ~10% of the bytes is done or `every` more items are, and one
  at the end.  Other processes stay silent.
  """

  def __init__(self, desc: str, total: int, total_bytes: int, *, progress: bool | None = None,
               logger: logging.Logger | None = None, every: int = 50, unit: str = "tensors",
               fraction: float = 0.1):
    self.desc, self.total, self.total_bytes, self.unit = desc, int(total), int(total_bytes), unit
    self.done, self.done_bytes = 0, 0
    self._log = logger or logging.getLogger("ddk_jax")
    self._every, self._fraction = max(1, int(every)), fraction
    self._start = time.monotonic()
    self._last_logged_items, self._next_tick = 0, 1  # log when the done fraction reaches tick * fraction
    self._bar = None
    self._active = is_main_process()
    self._closed = False
    if self._active and (progress if progress is not None else stderr_is_tty()):
      from tqdm.auto import tqdm
      self._bar = tqdm(total=max(self.total_bytes, 1), desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                       dynamic_ncols=True, leave=True)
      self._bar.set_postfix_str(f"{unit} 0/{self.total}", refresh=False)

  @property
  def bar(self):
    return self._bar

  def update(self, items: int = 1, nbytes: int = 0) -> None:
    if not self._active or self._closed:
      return
    self.done += items
    self.done_bytes += nbytes
    if self._bar is not None:
      self._bar.set_postfix_str(f"{self.unit} {self.done}/{self.total}", refresh=False)
      self._bar.update(nbytes)
      return
    frac = self.done_bytes / self.total_bytes if self.total_bytes else self.done / max(self.total, 1)
    if self.done >= self.total:
      return  # close() writes the final line
    reached = frac >= self._next_tick * self._fraction - 1e-9
    if reached or self.done - self._last_logged_items >= self._every:
      while frac >= self._next_tick * self._fraction - 1e-9:
        self._next_tick += 1
      self._last_logged_items = self.done
      self._log.info("%s", self.line())

  def line(self) -> str:
    elapsed = time.monotonic() - self._start
    frac = self.done_bytes / self.total_bytes if self.total_bytes else self.done / max(self.total, 1)
    text = (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * frac:.0f}%), "
            f"{format_bytes(self.done_bytes)} of {format_bytes(self.total_bytes)}")
    if self.done >= self.total:
      return text + f", done in {format_duration(elapsed)}"
    text += f", {format_duration(elapsed)} elapsed"
    if frac > 0:
      text += f", ETA {format_duration(elapsed / frac * (1 - frac))}"
    return text

  def close(self, ok: bool = True) -> None:
    """Ends the bar, or writes the final log line (not when `ok` is False: the job failed)."""
    if not self._active or self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self.done and ok:
      self._log.info("%s", self.line())

  def __enter__(self) -> "TransferProgress":
    return self

  def __exit__(self, *exc) -> None:
    self.close(ok=exc[0] is None)
