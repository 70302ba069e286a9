"""Device mesh, logical-axis rules and placement of params and batches.

Every parameter and activation is described by logical axis names ('embed', 'vocab',
'batch', ...).  A rule table maps each logical name to zero or more mesh axes; the mapping
to a `PartitionSpec` drops a mesh axis when the dimension does not divide evenly (e.g. 4
KV heads on an 8-way tensor axis), so any model runs on any mesh, replicated where it
must be.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# MaxText-style defaults: batch over data and fsdp, weights' embed dim over fsdp (ZeRO-3),
# heads / mlp / vocab over tensor (Megatron).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)

_log = logging.getLogger(__name__)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills a single -1 entry so the product equals num_devices; errors name the fix."""
  sizes = {a: int(shape[a]) for a in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size} is invalid: use a positive size or -1 (fill with the remaining devices).")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {fill}; give explicit sizes for all but one.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"mesh: {num_devices} devices cannot be split with fixed axes {sizes}; "
          f"make the product of the fixed axes divide {num_devices}.")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
        f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but there are {num_devices} devices; "
        "set the sizes so their product equals the device count, or set one axis to -1.")
  return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(shape, len(devices))
  dims = tuple(sizes[a] for a in MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(dims, devices=devices)
  except Exception:  # CPU / odd topologies: plain row-major order is fine.
    device_array = np.asarray(devices).reshape(dims)
  return Mesh(device_array, MESH_AXES)


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """Accepts a list of [logical, mesh-axes] pairs (config form) or returns the defaults."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for item in rules:
    name, axes = item
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> P:
  """PartitionSpec for an array with the given logical axes on this mesh."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    mesh_axes = (target,) if isinstance(target, str) else tuple(target)
    kept = []
    for ax in mesh_axes:
      size = mesh.shape[ax]
      denom = math.prod(mesh.shape[a] for a in kept) * size
      if ax in used or size == 1 or dim % denom:
        continue  # replicate instead of an uneven or repeated split
      kept.append(ax)
    used.update(kept)
    spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*spec)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedSharding tree from matching trees of logical axes (tuples) and shapes."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
      axes_tree, shapes_tree, is_leaf=lambda a: isinstance(a, tuple))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  batch_axes = dict(rules).get("batch")
  return NamedSharding(mesh, P(batch_axes, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules) -> int:
  target = dict(rules).get("batch")
  if target is None:
    return 1
  target = (target,) if isinstance(target, str) else target
  return math.prod(mesh.shape[a] for a in target)


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Makes global arrays from this process's rows (each host holds a disjoint slice)."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
      for k, v in batch.items()
  }


# Activation sharding constraints: the model calls `constrain(x, axes)`; it is a no-op
# unless a mesh and rules were installed with `activation_sharding(...)` (tests on one
# device and plain eager calls need no mesh).
_ACTIVE: list[tuple[Mesh, tuple]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules) -> Iterator[None]:
  _ACTIVE.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.pop()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))
