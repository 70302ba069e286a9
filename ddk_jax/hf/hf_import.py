"""Import a Hugging Face Llama / Mistral / Qwen2 (Qwen1.5) safetensors checkpoint.

Loading is streamed: for each of our (layer-stacked) params, this host fills only the
shards its devices hold, reading each HF tensor once (and only the rows those shards
need) straight from the safetensors file, converting to the target dtype per tensor,
then hands the shards to `jax.make_array_from_callback`.  Host memory peaks at one
param's local shards plus one HF tensor, so a 13B bf16 teacher loads on a 64 GB host.

The safetensors files are read by a small reader of our own (header JSON + byte
offsets) instead of `safe_open`: numpy has no bfloat16, so `safe_open(framework="numpy")`
fails on bf16 tensors, and the flax/jax frameworks would put every slice on the default
device.  Reading byte ranges through `etils.epath` also makes gs:// work on TPU VMs.

Safety: only safetensors are read; pickle-based checkpoints (.bin/.pt/...) are refused,
never unpickled, and no code from the checkpoint directory is ever run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from ddk_jax.cli import TransferProgress
from ddk_jax.hf.hf_config import (UnsupportedCheckpointError, architecture_mismatches, model_config_from_hf)
from ddk_jax.hf.param_names import TensorMap, param_mapping
from ddk_jax.model import DTYPES, ModelConfig, param_shapes_and_axes
from ddk_jax.sharding import DEFAULT_RULES, logical_to_spec

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_log = logging.getLogger("ddk_jax.hf")

# safetensors dtype tag <-> numpy dtype (bfloat16 from ml_dtypes).
ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
             "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}


class HFCheckpointError(ValueError):
  """A checkpoint directory is missing a file or holds unusable tensors."""


def convert_hint(path: str) -> str:
  return (
      "ddk_jax reads safetensors only and never unpickles checkpoints. Convert it once, in an environment you "
      "trust, with transformers: `AutoModelForCausalLM.from_pretrained(IN_DIR, dtype=\"auto\")"
      ".save_pretrained(OUT_DIR, safe_serialization=True)` (copy the tokenizer files along, e.g. with "
      "`AutoTokenizer.from_pretrained(IN_DIR).save_pretrained(OUT_DIR)`), or download the repo's safetensors "
      f"files instead. Checkpoint: {path}")


def _tree_get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _tree_set(tree: dict, path: Sequence[str], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ------------------------------------------------------------------- safetensors reading

@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str  # file name inside the checkpoint directory
  dtype: np.dtype | str  # str: a safetensors tag we cannot read (refused if the model needs it)
  shape: tuple[int, ...]
  begin: int  # absolute byte offset of the data in the file
  end: int


def read_safetensors_header(path: epath.Path) -> dict[str, TensorInfo]:
  """Parses a safetensors header (8-byte little-endian length + JSON); reads no tensor data."""
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise HFCheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes).")
    n = int.from_bytes(head, "little")
    if n <= 0 or n > 100 * 2**20:
      raise HFCheckpointError(f"{path}: not a safetensors file (header length {n}).")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise HFCheckpointError(f"{path}: corrupt safetensors header ({e}).") from e
  start = 8 + n
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    tag = meta["dtype"]
    shape = tuple(int(d) for d in meta["shape"])
    b, e = (int(x) for x in meta["data_offsets"])
    if tag not in ST_DTYPES:
      # Kept (so unused tensors of other dtypes do not block loading); refused when read.
      dtype = None
    else:
      dtype = ST_DTYPES[tag]
      if e - b != math.prod(shape) * dtype.itemsize:
        raise HFCheckpointError(f"{path}: tensor {name!r} has {e - b} bytes for shape {list(shape)} {tag}; "
                              "the file is corrupt or truncated.")
    out[name] = TensorInfo(path.name, dtype if dtype is not None else tag, shape, start + b, start + e)
  return out


class _Reader:
  """Byte-range reads from the checkpoint's safetensors files (handles kept open)."""

  def __init__(self, root: epath.Path, tensors: Mapping[str, TensorInfo]):
    self.root = root
    self.tensors = tensors
    self._files: dict[str, Any] = {}

  def read(self, name: str, elem_start: int, elem_stop: int) -> np.ndarray:
    """Flat elements [elem_start, elem_stop) of tensor `name` (C order), in its stored dtype."""
    info = self.tensors[name]
    if not isinstance(info.dtype, np.dtype):
      raise HFCheckpointError(f"tensor {name!r} in {info.file} has dtype {info.dtype}; supported: "
                            f"{sorted(ST_DTYPES)}.")
    f = self._files.get(info.file)
    if f is None:
      f = self._files[info.file] = (self.root / info.file).open("rb")
    item = info.dtype.itemsize
    f.seek(info.begin + elem_start * item)
    count = elem_stop - elem_start
    data = f.read(count * item)
    if len(data) != count * item:
      raise HFCheckpointError(f"{self.root / info.file}: truncated while reading tensor {name!r}.")
    return np.frombuffer(data, dtype=info.dtype)

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()


# ------------------------------------------------------------------- checkpoint directory

@dataclasses.dataclass
class HFCheckpoint:
  """An opened (validated) checkpoint directory: config and tensor locations, no weights."""
  root: epath.Path
  config_json: dict
  cfg: ModelConfig
  tensors: dict[str, TensorInfo]
  files: list[str]


def _as_path(path: str | os.PathLike) -> epath.Path:
  return epath.Path(path)


def _list_names(root: epath.Path) -> list[str]:
  try:
    return sorted(p.name for p in root.iterdir())
  except Exception:  # noqa: BLE001 - some object stores cannot list; fall back to known names
    return []


def _find_weight_files(root: epath.Path) -> list[str]:
  """Safetensors files of the checkpoint, from the index when there is one."""
  index_path = root / INDEX_FILE
  if index_path.exists():
    try:
      index = json.loads(index_path.read_text())
      weight_map = index["weight_map"]
    except (ValueError, KeyError) as e:
      raise HFCheckpointError(
          f"{index_path}: unreadable index ({e!r}); expected a JSON object with 'weight_map'.") from e
    files = sorted(set(weight_map.values()))
    for name in files:
      if not (root / name).exists():
        example = next(k for k, v in weight_map.items() if v == name)
        raise HFCheckpointError(
            f"{root / name} is missing: {INDEX_FILE} maps tensors (e.g. {example!r}) "
            "to it. Re-download or re-copy the full checkpoint.")
    return files
  if (root / SINGLE_FILE).exists():
    return [SINGLE_FILE]
  names = _list_names(root)
  pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) or n == "pytorch_model.bin.index.json"]
  if pickles:
    raise HFCheckpointError(f"{root} has only pickle weights ({', '.join(pickles[:4])}). " + convert_hint(str(root)))
  others = [n for n in names if n.endswith(".safetensors")]
  if "consolidated.safetensors" in others or "params.json" in names:
    raise HFCheckpointError(
        f"{root} looks like a Mistral-native checkpoint (consolidated.safetensors / params.json), whose tensor "
        "names are not transformers'. Use the repo's transformers-format files (config.json + model*.safetensors).")
  if others:
    return others
  raise HFCheckpointError(
      f"{root / SINGLE_FILE} is missing (and there is no {INDEX_FILE} for a sharded checkpoint). "
      "Point to a Hugging Face model directory saved with safetensors.")


def open_checkpoint(path: str | os.PathLike, config_overrides: Mapping[str, Any] | None = None) -> HFCheckpoint:
  """Validates a checkpoint directory without reading weights; errors name the missing file.

  Reads config.json and the safetensors headers, and checks that every tensor the model
  needs is present with the shape config.json implies.
  """
  root = _as_path(path)
  if str(path).endswith(PICKLE_SUFFIXES):
    raise HFCheckpointError(f"{path} is a pickle checkpoint file. " + convert_hint(str(path)))
  if not root.exists():
    raise HFCheckpointError(f"checkpoint directory {root} does not exist.")
  if not root.is_dir():
    raise HFCheckpointError(f"{root} is a file; pass the Hugging Face model directory that holds {CONFIG_FILE}.")
  config_path = root / CONFIG_FILE
  if not config_path.exists():
    raise HFCheckpointError(f"{config_path} is missing; a Hugging Face checkpoint directory needs {CONFIG_FILE}.")
  try:
    config_json = json.loads(config_path.read_text())
  except ValueError as e:
    raise HFCheckpointError(f"{config_path}: invalid JSON ({e}).") from e
  cfg = model_config_from_hf(config_json, where=str(config_path), **dict(config_overrides or {}))
  files = _find_weight_files(root)
  tensors: dict[str, TensorInfo] = {}
  for name in files:
    tensors.update(read_safetensors_header(root / name))
  ckpt = HFCheckpoint(root, config_json, cfg, tensors, files)
  _check_tensors(ckpt)
  return ckpt


def _check_tensors(ckpt: HFCheckpoint) -> None:
  cfg = ckpt.cfg
  expected: dict[str, tuple[int, ...]] = {}
  for m in param_mapping(cfg):
    for name in m.names(cfg.num_layers):
      expected[name] = m.hf_shape
  where = ", ".join(ckpt.files) if len(ckpt.files) <= 3 else f"{len(ckpt.files)} safetensors files"
  missing = [n for n in expected if n not in ckpt.tensors]
  if missing:
    raise HFCheckpointError(
        f"{ckpt.root}: tensor {missing[0]!r} is missing from {where}"
        + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
        + ". The files do not match config.json (wrong directory, a partial download, or a different architecture).")
  for name, shape in expected.items():
    if not isinstance(ckpt.tensors[name].dtype, np.dtype):
      raise UnsupportedCheckpointError(
          f"{ckpt.root}: tensor {name!r} is stored as {ckpt.tensors[name].dtype}; supported: {sorted(ST_DTYPES)} "
          "(quantized checkpoints are not supported).")
    if ckpt.tensors[name].shape != shape:
      raise HFCheckpointError(
          f"{ckpt.root}: tensor {name!r} has shape {list(ckpt.tensors[name].shape)} in {ckpt.tensors[name].file}, "
          f"but config.json implies {list(shape)}.")
  # Tensors we would silently drop mean weights the model does not compute with; refuse them.
  # (A tied checkpoint may still carry lm_head.weight; transformers ignores it too.)
  ignorable = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
  extra = sorted(n for n in ckpt.tensors
                 if n not in expected and n not in ignorable and not n.endswith("rotary_emb.inv_freq"))
  if extra:
    raise UnsupportedCheckpointError(
        f"{ckpt.root}: tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} are not part of the "
        f"{ckpt.config_json.get('architectures')} model ddk_jax builds from config.json; refusing to drop them.")


def validate_checkpoint_dir(path: str | os.PathLike, expected_cfg: ModelConfig | None = None) -> ModelConfig:
  """Fails fast (before any training work) if `path` is not a loadable checkpoint.

  Returns the ModelConfig it describes. With `expected_cfg`, also checks the architecture
  matches (error lists each differing field).
  """
  ckpt = open_checkpoint(path)
  if expected_cfg is not None:
    _check_expected(ckpt, expected_cfg)
  return ckpt.cfg


def _check_expected(ckpt: HFCheckpoint, expected_cfg: ModelConfig) -> None:
  diffs = architecture_mismatches(ckpt.cfg, expected_cfg)
  if diffs:
    raise HFCheckpointError(
        f"{ckpt.root / CONFIG_FILE} does not match the configured model (checkpoint vs config): "
        + "; ".join(diffs) + ". Fix the model config or point to the right checkpoint.")


def check_vocab_compatible(teacher_cfg: ModelConfig, student_cfg: ModelConfig, *,
                           tokenizer_vocab_size: int | None = None) -> int:
  """Checks teacher and student score the same token ids; returns the vocab size KD compares over.

  Equal vocab sizes pass.  Different sizes only pass when `tokenizer_vocab_size` (the
  number of real token ids) fits in both: families such as Qwen1.5 pad the embedding to
  different sizes per model (14B: 152064, 1.8B: 151936), and rows past the tokenizer are
  never produced.  The returned size is then min(teacher, student); the KD loss must
  compare logits over the first that many ids.
  """
  vt, vs = teacher_cfg.vocab_size, student_cfg.vocab_size
  if vt == vs:
    return vt
  if tokenizer_vocab_size is not None and tokenizer_vocab_size <= min(vt, vs):
    return min(vt, vs)
  hint = (f"tokenizer_vocab_size={tokenizer_vocab_size} exceeds the smaller one" if tokenizer_vocab_size
          else "if both use the same tokenizer and only the padding differs, pass the tokenizer's vocab size "
               "(tokenizer_vocab_size) to compare over the shared ids")
  raise ValueError(
      f"vocab mismatch: teacher vocab_size={vt}, student vocab_size={vs}. Distillation compares logits "
      f"token by token, so both models must use the same tokenizer; {hint}.")


# --------------------------------------------------------------------------- loading

def _norm_index(index: tuple, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  out = []
  for s, dim in zip(index, shape):
    start, stop, step = s.indices(dim)
    if step != 1:
      raise ValueError(f"unexpected strided shard index {index}")
    out.append((start, stop))
  return tuple(out)


def _load_param(reader: _Reader, m: TensorMap, cfg: ModelConfig, sharding, dtype: np.dtype,
                on_tensor: Callable[[str], None] | None = None) -> jax.Array:
  per_layer = tuple(m.split[p] for p in m.perm)
  shape = ((cfg.num_layers,) if m.stacked else ()) + per_layer
  lead = 1 if m.stacked else 0
  # One host buffer per distinct shard this process holds (replicas share it).
  keys = {}
  for _, index in sharding.addressable_devices_indices_map(shape).items():
    key = _norm_index(index, shape)
    keys.setdefault(key, None)
  buffers = {key: np.empty(tuple(b - a for a, b in key), dtype) for key in keys}
  ax0 = m.perm.index(0)  # our axis that HF's (split) leading axis becomes
  row = math.prod(m.split[1:])  # elements per step along the split leading axis
  layers = sorted({l for key in keys for l in range(*key[0])}) if m.stacked else [None]
  for layer in layers:
    name = m.hf_name.format(i=layer) if m.stacked else m.hf_name
    users = [k for k in keys if not m.stacked or k[0][0] <= layer < k[0][1]]
    # Read once the leading-axis rows every local shard needs (contiguous bytes).
    lo = min(k[lead + ax0][0] for k in users)
    hi = max(k[lead + ax0][1] for k in users)
    block = reader.read(name, lo * row, hi * row).reshape((hi - lo,) + m.split[1:]).astype(dtype, copy=False)
    for key in users:
      ours = key[lead:]
      # Index the split view: split axis s is our axis perm.index(s).
      sel = []
      for s in range(len(m.split)):
        a, b = ours[m.perm.index(s)]
        sel.append(slice(a - lo, b - lo) if s == 0 else slice(a, b))
      piece = block[tuple(sel)].transpose(m.perm)
      if m.stacked:
        buffers[key][layer - key[0][0]] = piece
      else:
        buffers[key][...] = piece
    del block
    if on_tensor is not None:
      on_tensor(name)
  arr = jax.make_array_from_callback(shape, sharding, lambda index: buffers[_norm_index(index, shape)])
  return arr


def load_hf_checkpoint(path: str | os.PathLike, *, mesh: Mesh | None = None, rules=None,
                       param_dtype: str | None = None, expected_cfg: ModelConfig | None = None,
                       config_overrides: Mapping[str, Any] | None = None,
                       progress: bool | None = None) -> tuple[dict, ModelConfig]:
  """Loads an HF safetensors checkpoint into our param tree, placed with the target shardings.

  Args:
    path: local or gs:// directory with config.json and model.safetensors (or shards + index).
    mesh, rules: target mesh and logical-axis rules (defaults: `sharding.DEFAULT_RULES`);
      mesh=None puts everything on the first local device.
    param_dtype: storage dtype of the params ("float32" | "bfloat16" | "float16"); default:
      `expected_cfg.param_dtype` if given, else the checkpoint's dtype.
    expected_cfg: the configured model; its architecture must match config.json (errors list
      every differing field) and its run-time fields (compute dtype, remat, ...) are kept.
    config_overrides: ModelConfig fields to set on the config read from config.json.
    progress: on process 0, a tqdm bar of tensors and bytes read when True, or when None and
      stderr is a terminal; otherwise an INFO log line (logger "ddk_jax.hf") every ~10% of
      the bytes or 50 tensors.  Other processes report nothing.

  Returns:
    (params, cfg): the pure-dict param tree of `model.param_shapes_and_axes(cfg)` and the config.
  """
  ckpt = open_checkpoint(path, config_overrides)
  cfg = ckpt.cfg
  if expected_cfg is not None:
    _check_expected(ckpt, expected_cfg)
    cfg = dataclasses.replace(expected_cfg)
  if param_dtype is not None:
    if param_dtype not in DTYPES:
      raise ValueError(f"param_dtype {param_dtype!r} is not one of {sorted(DTYPES)}")
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype)
  dtype = np.dtype(DTYPES[cfg.param_dtype])
  shapes, axes = param_shapes_and_axes(cfg)
  rules = rules if rules is not None else DEFAULT_RULES
  reader = _Reader(ckpt.root, ckpt.tensors)
  params: dict = {}
  mapping = param_mapping(cfg)
  names = [n for m in mapping for n in m.names(cfg.num_layers)]
  nbytes = {n: ckpt.tensors[n].end - ckpt.tensors[n].begin for n in names}
  bar = TransferProgress(f"HF import {ckpt.root.name}", len(names), sum(nbytes.values()), progress=progress,
                         logger=_log)
  counted: set[str] = set()

  def count(name: str) -> None:
    if name not in counted:
      counted.add(name)
      bar.update(1, nbytes[name])

  try:
    with bar:
      for m in mapping:
        shape = _tree_get(shapes, m.path)
        if mesh is None:
          sharding = SingleDeviceSharding(jax.local_devices()[0])
        else:
          sharding = NamedSharding(mesh, logical_to_spec(_tree_get(axes, m.path), shape, mesh, rules))
        arr = _load_param(reader, m, cfg, sharding, dtype, on_tensor=count)
        assert arr.shape == tuple(shape), (m.path, arr.shape, shape)
        _tree_set(params, m.path, arr)
        for name in m.names(cfg.num_layers):  # layers held only by other hosts count as done too
          count(name)
  finally:
    reader.close()
  return params, cfg


def iter_hf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array in stored dtype) for every tensor of a checkpoint, one at a time (tests, tools)."""
  ckpt = open_checkpoint(path)
  reader = _Reader(ckpt.root, ckpt.tensors)
  try:
    for name, info in sorted(ckpt.tensors.items()):
      yield name, reader.read(name, 0, math.prod(info.shape)).reshape(info.shape)
  finally:
    reader.close()
