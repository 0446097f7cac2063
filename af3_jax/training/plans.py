"""`--compile_only`'s memory plan of a stage's train step for every length bucket, from a checkpoint's
config alone (the figures are `af3_jax.memory`'s)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from af3_jax import files, sharding, targets
from af3_jax.checkpoints import locate
from af3_jax.checkpoints.pretrained import Model, abstract_model
from af3_jax.config import AF3Config
from af3_jax.memory import compiled_plan, fits, memory_summary
from af3_jax.training import pipeline, run as train_run, setup


def stage_plan(cfg, workdir: Path, init_from: str, on=None) -> int:
  """--compile_only: the stage's train step compiled for each length bucket at the stage's global batch
  (rows x accumulation, max_windows audio windows per row) on the config's mesh, from `init_from`'s
  config alone; prints the per-device plan and writes `workdir/memory.json`, then raises ValueError
  if a length does not fit the device. `on`: (target, its compile-only devices) from
  `targets.compile_only`, planned by that accelerator's compiler; None: the devices present."""
  target, devices = on or (None, jax.devices())
  capacity = target.hbm_bytes if target else targets.device_memory(devices[0])
  mesh = sharding.make_mesh(cfg.mesh, devices)
  model_cfg = locate.read_config(train_run.base_checkpoint(init_from))
  frozen, state, step_fn = abstract_step(cfg, model_cfg, mesh)
  rows = setup.global_rows(cfg, mesh)
  print(f"{target.name if target else 'devices present'}: {len(devices)} x {devices[0].device_kind}"
        f"{f' ({capacity / 2**30:.1f} GiB each)' if capacity else ''}; mesh {dict(mesh.shape)}; {rows} "
        f"{'packed ' if cfg.data.packing else ''}rows a step ({cfg.per_device_batch} per device x {cfg.accum_steps} "
        f"accumulated), {cfg.data.max_windows} window(s) a row; per device:")
  plan = []
  for length in pipeline.length_buckets(cfg.data.length_buckets, cfg.data.max_length):
    with jax.set_mesh(mesh):
      memory = compiled_plan(step_fn.lower(state, frozen, abstract_batch(cfg, mesh, length)), capacity)
    if memory is None:
      raise ValueError(f"the {devices[0].platform} compiler reports no memory plan")
    plan.append({"length": length, **memory})
    print(f"  length {length:>6}: {memory_summary(memory)}", flush=True)
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_text_atomic(workdir / "memory.json", json.dumps(plan, indent=2) + "\n")
  print(f"wrote {workdir / 'memory.json'}")
  over = [p["length"] for p in plan if not fits(p)]
  if over:  # the plan is written all the same: it says by how much
    raise ValueError(f"at length {', '.join(map(str, over))} the step does not fit the device")
  return 0


def abstract_step(cfg, model_cfg: AF3Config, mesh) -> tuple:
  """(frozen weights, step-0 train state, jitted train step) of the stage `cfg` for a model of
  `model_cfg`, as shapes only (no weights), the weights in the compute dtype `setup.load` keeps them in."""
  compute = np.dtype(cfg.compute_dtype)
  graphdef, abstract, _ = abstract_model(model_cfg, param_dtype=compute, compute_dtype=compute, mesh=mesh,
                                         remat=cfg.remat)
  _, frozen, state, step_fn = setup.build(cfg, Model(model_cfg, graphdef, abstract, mesh), mesh, total_steps=1000,
                                          abstract=True)
  return frozen, state, step_fn


def abstract_batch(cfg, mesh, length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The stage's global batch of `length`-token rows (`setup.global_rows`, max_windows audio windows a row),
  micro-batched for accumulation and sharded as the training loop shards it, as shapes."""
  template = pipeline.batch_shapes(setup.global_rows(cfg, mesh), cfg.data.max_windows, length, packed=cfg.data.packing)
  shapes = {k: jax.ShapeDtypeStruct(sharding.micro_batched(shape, cfg.accum_steps), dtype)
            for k, (shape, dtype) in template.items()}
  shardings = sharding.batch_shardings(shapes, mesh, cfg.accum_steps)
  return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[k]) for k, x in shapes.items()}
