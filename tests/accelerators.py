"""Compiling for a GPU or TPU on this CPU machine, and reading what its compiler made: the helpers of
the `accelerator` tests (docs/testing.md#checks-for-gpus-and-tpus-without-one).

`abstract_model` puts a model's shapes (no weights) on a target's compile-only devices; `compile_for`
lowers and compiles a jitted function for them under `jax.set_mesh`, as the library's entry points
trace, and returns a `Program`: the accelerator's optimised HLO, the questions the tests ask of it
(custom calls, cuDNN's attention calls, weights copied out of a layer stack) and XLA's memory plan.
Needs the `accelerators` extra and JAX_PLATFORMS=cpu before jax is imported (conftest.py sets it).
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax

from af3_jax import memory, sharding, targets
from af3_jax.checkpoints import pretrained
from af3_jax.config import AF3Config


@dataclasses.dataclass(frozen=True)
class CudnnAttention:
  """One cuDNN flash-attention call: its custom-call `target` (forward or backward, with a bias or
  not), `mask_type` (NO_MASK, CAUSAL, PADDING, PADDING_CAUSAL) and the shapes of q, k and v as
  (B, T, N, H) tuples."""

  target: str
  mask_type: str
  q: tuple[int, ...]
  k: tuple[int, ...]
  v: tuple[int, ...]

  @property
  def bias(self) -> bool:
    """Whether a dense (B, 1, T, S) bias goes in: how jax gives cuDNN any mask it has no argument for."""
    return "Bias" in self.target

  @property
  def backward(self) -> bool:
    return self.target.endswith("Backward")


@dataclasses.dataclass(frozen=True)
class Program:
  """A compiled program: `hlo`, its optimised HLO text; `memory`, `memory.memory_plan`'s figures."""

  hlo: str
  memory: dict[str, float] | None

  def custom_calls(self) -> collections.Counter[str]:
    """How often each custom-call target occurs (cuDNN, cuBLAS, Pallas kernels ...)."""
    return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', self.hlo))

  def cudnn_attention(self) -> list[CudnnAttention]:
    """Every cuDNN flash-attention call (`__cudnn$fmha...`), in the order of the HLO text."""
    calls = []
    for line in self.hlo.splitlines():
      target = re.search(r'custom_call_target="(__cudnn\$fmha\w*)"', line)
      if target:
        layouts = re.search(r"operand_layout_constraints=\{(.*?)\}, api_version", line).group(1)
        q, k, v = (tuple(map(int, dims.split(","))) for dims in re.findall(r"\w+\[([\d,]+)\]", layouts)[:3])
        calls.append(CudnnAttention(target.group(1), re.search(r'"mask_type": "(\w+)"', line).group(1), q, k, v))
    return calls

  def sliced_copies(self) -> list[str]:
    """Shapes of the arrays copied out of a dynamic slice, such as a layer's weights out of a stacked
    layer stack (XLA:GPU copies each slice before cuBLAS reads it)."""
    return re.findall(r"= (\w+\[[\d,]*\])\{[^}]*\} copy\(%dynamic[-_]slice", self.hlo)


def abstract_model(target: str, cfg: AF3Config, dtype, mesh_shape: tuple[int, int, int] | None = None,
                   quantize: str | None = None, remat: str | None = None, fused: bool = False) -> pretrained.Model:
  """A Model of `cfg` whose state is shapes with shardings on `target`'s compile-only devices (a
  (data, fsdp, tensor) mesh, all on fsdp by default), parameters and compute in `dtype`; `remat` as
  `from_pretrained` takes it (None: inference's unrolled layers; a policy: training's scan); `fused`:
  `Model.fused`'s joined projections."""
  devices = targets.devices(target)
  mesh = sharding.make_mesh(mesh_shape or (1, len(devices), 1), devices)
  graphdef, state, shardings = pretrained.abstract_model(cfg, param_dtype=dtype, compute_dtype=dtype, mesh=mesh,
                                                         quantize=quantize, remat=remat, fused=fused)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  return pretrained.Model(cfg, graphdef, state, mesh)


def compile_for(mesh: jax.sharding.Mesh, fn, *args, compiler_options: dict | None = None, **kwargs) -> Program:
  """`fn` (jitted) lowered with `args` (shapes or arrays) and its keyword arguments, and compiled for
  the devices of `mesh` (`compiler_options`: XLA options for this compile, e.g. a GPU flag), at the
  default matmul precision, as programs run outside the suite (conftest.py asks for "highest", which
  XLA:GPU compiles to other kernels: on an A100 a bf16 Triton GEMM it cannot tile)."""
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    compiled = fn.lower(*args, **kwargs).compile(compiler_options)
  return Program(compiled.as_text(), memory.memory_plan(compiled))
