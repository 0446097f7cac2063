"""Meshes, the logical-to-mesh sharding rules, and batches placed on a mesh. The only module that knows
mesh axis names.

Model code tags every parameter with logical axis names (`embed`, `heads`, `mlp`, ...); the rules below
map them onto the mesh axes `(data, fsdp, tensor)`. A mesh axis is dropped from a dimension it does not
divide (or that an earlier dimension already uses), so any model shape shards on any mesh; such
dimensions are replicated instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Weights shard their model width over `fsdp` (ZeRO-3 style) and their head/MLP/vocab width over
# `tensor` (Megatron style); activations shard the batch over `data` and `fsdp`.
LOGICAL_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over `devices` (default: every device present); by default every
  device on `fsdp`. One entry of `shape` may be -1: the devices the others leave (a config's mesh)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(shape) if shape is not None else (1, len(devices), 1)
  if -1 in shape:
    fixed = math.prod(s for s in shape if s != -1)
    shape = tuple(len(devices) // fixed if s == -1 else s for s in shape)
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
  """A mesh of one device (the first by default): where a model lives when no mesh is given."""
  return make_mesh((1, 1, 1), [device if device is not None else jax.devices()[0]])


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
                    rules: Rules = LOGICAL_RULES) -> P:
  """Logical axis names of an array -> a PartitionSpec whose mesh axes divide the array's dims."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape, strict=True):
    wanted = table.get(name) if name is not None else None
    wanted = (wanted,) if isinstance(wanted, str) else (wanted or ())
    chosen = []
    for axis in wanted:
      size = math.prod(mesh_shape[a] for a in chosen) * mesh_shape[axis]
      if axis not in used and mesh_shape[axis] > 1 and dim % size == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return P(*spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.State:
  """A NamedSharding for every variable of an abstract state, from its logical axes."""
  specs = nnx.get_partition_spec(abstract_state)
  mesh_shape = dict(mesh.shape)

  def one(spec, leaf):
    names = tuple(spec) if spec is not None else (None,) * len(leaf.shape)
    return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh_shape, rules))

  return jax.tree.map(one, specs, abstract_state, is_leaf=lambda x: isinstance(x, P) or x is None)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> jax.Array:
  """Pins an activation's sharding by logical axes when tracing under `jax.set_mesh`; else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, dict(mesh.shape), rules))


def batch_shardings(batch: dict[str, jax.Array], mesh: Mesh, accum_steps: int = 1) -> dict[str, NamedSharding]:
  """Each batch array split over `batch` (data, fsdp) on its first example axis (windows for audio),
  after the leading micro-batch axis when accum_steps > 1. A mesh axis that does not divide a dim is
  dropped."""
  lead = (None,) if accum_steps > 1 else ()

  def one(x):
    axes = (*lead, "batch", *(None,) * (x.ndim - len(lead) - 1))
    return NamedSharding(mesh, logical_to_spec(axes, x.shape, dict(mesh.shape)))

  return jax.tree.map(one, batch)


def micro_batched(shape: tuple[int, ...], accum_steps: int) -> tuple[int, ...]:
  """A batch array's shape with a leading micro-batch axis when accum_steps > 1 (rows split evenly)."""
  return (accum_steps, shape[0] // accum_steps, *shape[1:]) if accum_steps > 1 else tuple(shape)


def global_batch(host: dict[str, np.ndarray], mesh: Mesh, accum_steps: int) -> dict[str, jax.Array]:
  """This host's rows -> global arrays split over the batch axes (an explicit host-to-device transfer).
  With accumulation, a leading micro-batch axis: rows and their row-aligned audio windows split into
  `accum_steps` equal parts."""
  host = {k: x.reshape(micro_batched(x.shape, accum_steps)) for k, x in host.items()}
  batch_axis = int(accum_steps > 1)

  def global_shape(x):
    shape = list(x.shape)
    shape[batch_axis] *= jax.process_count()
    return tuple(shape)

  shardings = batch_shardings({k: jax.ShapeDtypeStruct(global_shape(x), x.dtype) for k, x in host.items()},
                              mesh, accum_steps)
  # The one place a training batch goes up: allowed here even under the loop's transfer guard
  # (with several processes, make_array_from_process_local_data copies by an implicit device_put).
  with jax.transfer_guard_host_to_device("allow"):
    return {k: jax.make_array_from_process_local_data(shardings[k], x, global_shape(x)) for k, x in host.items()}
