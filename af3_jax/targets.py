"""Accelerators to compile for, present or not, and the platform a traced program runs on.

JAX can run an accelerator's real compiler on a machine without one ("deviceless" compilation): a
topology description gives compile-only devices, a mesh of them takes `ShapeDtypeStruct` inputs, and
`jax.jit(f).lower(...).compile()` returns that accelerator's optimised HLO and memory plan (no timings).
This is how the tests check what a GPU or TPU would run (cuDNN and Pallas kernels, copies, memory) and
how `train.py --compile_only --target` plans a cluster from a laptop. It needs the `accelerators` extra
(the CUDA plugin with ptxas and cuDNN, and libtpu) and `JAX_PLATFORMS=cpu` set before jax is imported:
otherwise the CUDA plugin looks for a GPU and is not registered. Nothing here allocates device memory.

Target names: `h100`, `h200`, `a100` (80 GB SXM), optionally with a device count (`h100-8`); Cloud TPU
slice names `v4-8`, `v5p-8`, `v5e-4`, `v6e-8` ... (the count is TensorCores for v4 and v5p, which pair
two per chip as one jax device, and chips for v5e and v6e, as Cloud TPU names them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from importlib import resources

import jax

GIB = 2**30

# XLA's device descriptions (openxla/xla xla/backends/gpu/target_config/specs/), without a field that
# jaxlib 0.10 cannot parse. The compiler reads core counts, shared memory and the compute capability
# from them, so fusion and kernel choices are the card's own.
_GPU_SPECS = {"h100": "h100.txtpb", "h200": "h200.txtpb", "a100": "a100.txtpb"}

# platform -> (the module that compiles for it, its name for people)
_COMPILERS = {"gpu": ("jax_cuda12_plugin", "jax's CUDA plugin"), "tpu": ("libtpu", "libtpu")}

# generation -> (libtpu's name, chip config, TensorCores per jax device in the slice name, HBM per device)
_TPUS = {
    "v4": ("v4", "megacore", 2, 32 * GIB),
    "v5p": ("v5", "megacore", 2, 95 * GIB),
    "v5e": ("v5e", "default", 1, 16 * GIB),
    "v6e": ("v6e", "default", 1, 32 * GIB),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """An accelerator slice: `platform` "gpu" or "tpu", `count` jax devices of `hbm_bytes` each."""

  name: str
  platform: str
  count: int
  hbm_bytes: int


def parse(name: str) -> Target:
  """`h100`, `h100-8`, `v5p-8`, ... -> a Target; ValueError naming the known ones otherwise."""
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+))?", name.strip().lower())
  kind, n = (m.group(1), int(m.group(2) or 1)) if m else (name, 0)
  if kind in _GPU_SPECS and n >= 1:
    return Target(name, "gpu", n, _gpu_memory(kind))
  if kind in _TPUS and n >= 1:
    per_device = _TPUS[kind][2]
    if n % per_device or not _tpu_grid(n // per_device, 3 if per_device == 2 else 2):
      raise ValueError(f"no {kind} slice of {n} {'TensorCores' if per_device == 2 else 'chips'}")
    return Target(name, "tpu", n // per_device, _TPUS[kind][3])
  raise ValueError(f"unknown target {name!r}: use h100, h200 or a100 (optionally -N devices), "
                   f"or a TPU slice such as v4-8, v5p-8, v5e-4, v6e-8")


def devices(target: Target | str) -> list[jax.Device]:
  """Compile-only devices of `target` (no accelerator needed), in the order a mesh takes them."""
  target = parse(target) if isinstance(target, str) else target
  from jax.experimental import topologies

  kind = re.match(r"[a-z0-9]+?(?=-\d+$|$)", target.name.lower()).group(0)
  try:
    if target.platform == "gpu":
      text = resources.files("af3_jax.gpu_specs").joinpath(_GPU_SPECS[kind]).read_text()
      topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology=f"1x1x{target.count}")
    else:
      os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
      # libtpu locks the chips it drives; compile-only devices drive none, so compiles may run side by side.
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
      lib_name, chip_config, _, _ = _TPUS[kind]
      grid = _tpu_grid(target.count, 3 if chip_config == "megacore" else 2)
      topo = topologies.get_topology_desc(
          topology_name=f"{lib_name}:{'x'.join(map(str, grid))}", platform="tpu", chip_config_name=chip_config,
          chips_per_host_bounds=(min(grid[0], 2), min(grid[1], 2), 1), num_slices=1, wrap=(False,) * 3)
  except (NotImplementedError, RuntimeError, ValueError) as e:
    plugin = "jax's CUDA plugin" if target.platform == "gpu" else "libtpu"
    raise RuntimeError(f"cannot compile for {target.name}: {plugin} is not usable here ({str(e).splitlines()[0]}); "
                       "install the project's `accelerators` extra and set JAX_PLATFORMS=cpu before jax "
                       "is imported") from e
  return list(topo.devices)


def compile_only(name: str) -> tuple[Target, list[jax.Device]]:
  """A command line's `--target`: (the target, its compile-only devices).

  Call it before anything starts a jax backend: it keeps jax itself on the host CPU, which is what lets
  the CUDA plugin register without a GPU (whatever devices the machine has, the plan is the target's).
  An unknown name, or a target whose compiler is not installed, is a ValueError of one line.
  """
  target = parse(name)
  compiler = _COMPILERS[target.platform]
  if importlib.util.find_spec(compiler[0]) is None:
    raise ValueError(f"--target {name} needs {compiler[1]}, which is not installed: "
                     "pip install 'af3-jax[accelerators]' (or `pip install -e '.[accelerators]'` in a checkout)")
  jax.config.update("jax_platforms", "cpu")
  try:
    return target, devices(target)
  except RuntimeError as e:
    raise ValueError(str(e)) from None


def device_memory(device: jax.Device) -> int | None:
  """Bytes of memory a present device offers its programs, or None where it does not say (a CPU)."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  return (stats or {}).get("bytes_limit")


def platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> str:
  """"gpu", "tpu" or "cpu": where the program being traced will run.

  By default the mesh set by `jax.set_mesh` (inside jit, its abstract form knows the platform), so a
  deviceless GPU or TPU compile takes the GPU or TPU path; with no mesh set, jax's default backend.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if isinstance(mesh, jax.sharding.Mesh):
    return _normalise(mesh.devices.flat[0].platform)
  if mesh is not None and not mesh.empty and mesh.abstract_device is not None:
    return _normalise(mesh.abstract_device.platform)
  return _normalise(jax.default_backend())


def _normalise(name: str) -> str:
  return "gpu" if name in ("cuda", "rocm", "gpu") else name


def _gpu_memory(kind: str) -> int:
  text = resources.files("af3_jax.gpu_specs").joinpath(_GPU_SPECS[kind]).read_text()
  return int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))


def _tpu_grid(chips: int, rank: int) -> tuple[int, ...] | None:
  """The chip grid of a slice as Cloud TPU shapes it, or None when `chips` is not a power of two.
  2-D (v5e, v6e): 1x1, 1x2, 2x2, 2x4, 4x4, ...; 3-D (v4, v5p): 1x1x1, 1x2x1, 2x2x1 (one host),
  then 2x2x2, 2x2x4, 2x4x4, 4x4x4, ..."""
  if chips < 1 or chips & (chips - 1):
    return None
  k = chips.bit_length() - 1
  if rank == 2:
    return 2 ** (k // 2), 2 ** (k - k // 2)
  if k <= 2:
    return ((1, 1, 1), (1, 2, 1), (2, 2, 1))[k]
  return tuple(2 ** ((k + i) // 3) for i in range(3))
