"""What XLA compiles for inference, per layer layout: compile time, temporaries, weight copies, bytes.

  JAX_PLATFORMS=cpu python bench/bench_compile.py --target h200 --size full   # needs the accelerators extra
  python bench/bench_compile.py --target cpu --size tiny
  (from the repo root, with af3_jax installed or PYTHONPATH=.)

Nothing runs and nothing is allocated: each program is compiled from abstract weights for --target, a
GPU that need not be here (`targets.devices`), as the tests check it. Programs: `generate_stream`'s
decode step (`slots.decode_fn`, batch --batch, one step, a cache of a 30 s prompt's bucket
(`buckets.prompt_bucket`) plus 64 new tokens: the body of `generate`'s loop), the engine's
(`slots.decode_fn`, 8 slots, a 1,024-slot window: 30 s requests) and the prefill of 30 s or 10 min of
audio (`slots.prefill_fn`: audio encoder, projector, the prompt into a cache of its own).

Layouts: `unrolled` (inference: each layer reads its weights at a static index of the stacks), `rolled`
(training's `lax.scan`: a dynamic slice of the stacks per layer, as inference ran before), `per-layer`
(each layer's weights separate arguments of the program, as a list-of-layers model holds them; the
program stacks them back and XLA folds that away, so it compiles what such a model would).
`--xla-passes all` compiles with the two XLA passes that inference programs leave out
(`layers.INFERENCE_COMPILER_OPTIONS`), to show what they would do.

Columns: compile seconds, wall and CPU (this process's threads and the ptxas runs it waits for;
lowering included; the CPU time is the steadier figure on a shared machine; a real GPU also
autotunes), temporaries, weight copies
(kernels written again: a slice, copy or dtype conversion of a stacked kernel), other writes of a
kernel's shape (matmuls XLA turns into multiply + reduce write x * W), matmul fusions that convert
int8 kernels inside, and bytes accessed (XLA's cost model on the compiled program; a rolled loop's body
counts once, so rolled rows undercount by the layers).
"""

from __future__ import annotations

import datetime
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx, traverse_util

from af3_jax import hlo, sharding, targets
from af3_jax.buckets import prompt_bucket
from af3_jax.checkpoints import pretrained
from af3_jax.inference import engine, requests, slots
from af3_jax.models import layers
from af3_jax.models.whisper import tokens_per_window
from presets import MODELS

_TARGET = flags.DEFINE_string("target", "h200", "cpu, or a GPU target of `targets.parse` (h100, h200, a100).")
_SIZE = flags.DEFINE_enum("size", "full", sorted(MODELS), "A model preset (bench/presets.py).")
_PROGRAMS = flags.DEFINE_multi_enum("program", ["decode", "engine", "prefill-30s"],
                                    ["decode", "engine", "prefill-30s", "prefill-10min"], "Programs to compile.")
_LAYOUTS = flags.DEFINE_multi_enum("layout", ["unrolled", "rolled"], ["unrolled", "rolled", "per-layer"],
                                   "Layer layouts (see the module docstring).")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "The weights, as from_pretrained's quantize.")
_PROJECTIONS = flags.DEFINE_enum("projections", "separate", ["separate", "fused"],
                                 "The decoder's projections as loaded, or joined (`Model.fused`).")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows of the decode step.")
_PASSES = flags.DEFINE_enum("xla-passes", "inference", ["inference", "all"],
                            "inference: without the XLA passes `layers.INFERENCE_COMPILER_OPTIONS` disables, as "
                            "the library compiles; all: with them, to see what they would do.")

AUDIO = {"prefill-30s": 1, "prefill-10min": 20}  # 30 s windows
NEW_TOKENS = 64
PROMPT = 16  # text tokens around the audio, as bench_infer.py's prompts
SLOTS = 8


def abstract_weights(cfg, mesh, remat, quantize, fused):
  """(graphdef, weights as ShapeDtypeStructs sharded on `mesh`)."""
  graphdef, state, shardings = pretrained.abstract_model(cfg, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16,
                                                         mesh=mesh, remat=remat, quantize=quantize, fused=fused)
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def program(name: str, cfg, mesh):
  """(the jitted library function, its arguments after graphdef and weights, its static keywords)."""
  replicated = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, jax.P())), tree)
  prompt = prompt_bucket(tokens_per_window(cfg.encoder) * AUDIO.get(name, 1) + PROMPT, requests.MIN_BUCKET)
  if name in ("decode", "engine"):
    b, length, steps = (_BATCH.value, prompt + NEW_TOKENS, 1) if name == "decode" else (SLOTS, 1024,
                                                                                         engine.DECODE_STEPS)
    state = jax.eval_shape(lambda: slots.empty_fn(cfg, batch=b, length=length, dtype=jnp.bfloat16))
    return slots.decode_fn, (replicated(state), np.ones(b, np.int32)), dict(window=length, steps=steps)
  shape = requests.Shape(1, prompt, AUDIO[name])
  return slots.prefill_fn, replicated(requests.dummy_batch(cfg, shape)), {}


def options() -> dict | None:
  return layers.INFERENCE_COMPILER_OPTIONS if _PASSES.value == "inference" else None


def per_layer(fn, graphdef, weights):
  """`fn` taking each stacked weight as a tuple of its layers' arrays, stacked again inside the program."""
  stacked = lambda path: "layers" in jax.tree_util.keystr(path)

  def split(path, x):
    if not stacked(path):
      return x
    spec = x.sharding.spec
    one = jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=jax.NamedSharding(x.sharding.mesh, jax.P(*spec[1:])))
    return (one,) * x.shape[0]

  def restacked(parts, *args, **static):
    tree = jax.tree.map(lambda p: jnp.stack(p) if isinstance(p, tuple) else p, parts,
                        is_leaf=lambda p: isinstance(p, tuple))
    return fn.__wrapped__(graphdef, tree, *args, **static)

  jitted = jax.jit(restacked, static_argnames=("window", "steps"), compiler_options=options())
  return jitted, jax.tree_util.tree_map_with_path(split, weights)


def cpu_seconds() -> float:
  """CPU time of this process's threads and of the children it waited for (XLA runs ptxas as one)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bytes_accessed(compiled) -> float | None:
  """XLA's cost model over the compiled module (a private API: a deviceless executable has no
  cost_analysis of its own); None where it is unavailable."""
  try:
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    module = compiled.runtime_executable().hlo_modules()[0]
    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module).get("bytes accessed")
  except Exception:  # noqa: BLE001: private, may change between versions
    return None


def measure(name: str, layout: str, cfg, mesh) -> str:
  quantize = None if _QUANTIZE.value == "none" else _QUANTIZE.value
  graphdef, weights = abstract_weights(cfg, mesh, "none" if layout == "rolled" else None, quantize,
                                       _PROJECTIONS.value == "fused")
  fn, args, static = program(name, cfg, mesh)
  start, cpu_start = time.perf_counter(), cpu_seconds()
  with jax.set_mesh(mesh):
    if layout == "per-layer":
      jitted, parts = per_layer(fn, graphdef, weights)
      compiled = jitted.lower(parts, *args, **static).compile()
    elif _PASSES.value == "all":
      jitted = jax.jit(fn.__wrapped__, static_argnums=0, static_argnames=tuple(static))
      compiled = jitted.lower(graphdef, weights, *args, **static).compile()
    else:
      compiled = fn.lower(graphdef, weights, *args, **static).compile()
  seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
  text = compiled.as_text()
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(weights))
  kernels = {x.shape[1:] for path, x in flat.items() if "layers" in path and path[-1] == "kernel"}
  weight_bytes = sum(x.size * x.dtype.itemsize for x in flat.values())
  writes = hlo.writes_of_shape(text, kernels)
  copies = [i for i in writes if i.copies]
  int8_matmuls = sum({"dot", "convert"} <= i.fused for i in hlo.instructions(text)) if quantize else "-"
  temp = compiled.memory_analysis().temp_size_in_bytes
  accessed = bytes_accessed(compiled)
  gb = lambda x: "n/a" if x is None else f"{x / 1e9:.3f}"
  return (f"| {name} | {layout} | {weight_bytes / 1e9:.2f} | {seconds:.1f} / {cpu:.1f} | {temp / 1e6:.1f} "
          f"({temp / weight_bytes:.2%}) | {len(copies)} | {len(writes) - len(copies)} | {int8_matmuls} "
          f"| {gb(accessed)} |")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = MODELS[_SIZE.value]
  devices = jax.devices("cpu")[:1] if _TARGET.value == "cpu" else targets.devices(_TARGET.value)[:1]
  mesh = sharding.make_mesh((1, 1, 1), devices)
  print(f"{_SIZE.value} AF3, bfloat16, quantize {_QUANTIZE.value}, {_PROJECTIONS.value} projections, decode batch "
        f"{_BATCH.value}, XLA passes: {_PASSES.value}, for {devices[0].device_kind} | JAX {jax.__version__} | "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}", flush=True)
  print("| program | layout | weights GB | compile s (wall / CPU) | temporaries MB | weight copies "
        "| other kernel-shaped writes | int8 matmuls converting inside | bytes accessed GB |\n"
        "|---|---|---|---|---|---|---|---|---|", flush=True)
  for name in _PROGRAMS.value:
    for layout in _LAYOUTS.value:
      print(measure(name, layout, cfg, mesh), flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
