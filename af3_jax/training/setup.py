"""A stage's run set up from its config: the settings and data checked before anything heavy, the mesh,
the model loaded for training, and its train state and jitted step."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from af3_jax.data.manifest import Sample, read_manifest
from af3_jax.models import layers
from af3_jax.training import optimizer as optim, run as train_run, step as train_step


def check_config(cfg, needs_data: bool = True) -> None:
  """Raises ValueError naming the first setting that cannot work, before anything is loaded
  (`needs_data` False: a memory plan, which reads no manifest)."""
  floats = ("float32", "bfloat16", "float16")
  checks = [
      (bool(cfg.init_from), "--config.init_from is required: a checkpoint or the previous stage's workdir"),
      (bool(cfg.data.train) or not needs_data, "--config.data.train is required: comma-separated JSON manifests"),
      (cfg.trainable in train_step.TRAINABLE, f"trainable must be one of {sorted(train_step.TRAINABLE)}"),
      (cfg.remat in layers.REMAT_POLICIES, f"remat must be one of {sorted(layers.REMAT_POLICIES)}"),
      (cfg.param_dtype in floats and cfg.compute_dtype in floats, f"param_dtype and compute_dtype are one of {floats}"),
      (cfg.total_steps >= 0, "total_steps must be >= 0 (0: epochs x steps per epoch)"),
      (cfg.total_steps > 0 or cfg.epochs >= 1, "epochs must be >= 1 when total_steps is 0"),
      (min(cfg.per_device_batch, cfg.accum_steps) >= 1, "per_device_batch and accum_steps must be >= 1"),
      (min(cfg.save_every, cfg.keep_checkpoints, cfg.log_every) >= 1,
       "save_every, keep_checkpoints and log_every must be >= 1"),
      (min(cfg.data.max_length, cfg.data.max_windows) >= 1, "data.max_length and data.max_windows must be >= 1"),
      (len(cfg.mesh) == 3 and list(cfg.mesh).count(-1) <= 1 and all(s == -1 or s >= 1 for s in cfg.mesh),
       "mesh is (data, fsdp, tensor), sizes >= 1 and at most one -1"),
  ]
  for ok, problem in checks:
    if not ok:
      raise ValueError(f"{problem}; see configs/common.py")


def read_samples(manifests: str) -> list[Sample]:
  """Every sample of the comma-separated manifests; an empty one is an error naming it."""
  samples = []
  for path in manifests.split(","):
    these = read_manifest(path)
    if not these:
      raise ValueError(f"{path}: the manifest holds no samples")
    samples += these
  return samples


def count(state: nnx.State) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def load(cfg, init_from: str, mesh):
  """The model to train from `init_from` (a checkpoint `workdirs.resolve_init` names), as `cfg` says:
  frozen weights stay in the compute dtype (the trainable ones get param_dtype copies in `build`),
  with its remat policy."""
  return train_run.load_model(init_from, dtype=np.dtype(cfg.compute_dtype), mesh=mesh, remat=cfg.remat)


def build(cfg, model, mesh, total_steps: int, abstract: bool = False):
  """(graphdef, frozen weights, step-0 train state, jitted train step) as `cfg` says: its trainable set,
  dtypes, optimizer and accumulation. `abstract`: the model's state holds shapes only, and so does the
  train state (for compiling ahead of time)."""
  graphdef, trainable, frozen = train_step.prepare(model, cfg.trainable, train_step.lora_spec(cfg), cfg.seed)
  optimizer = optim.make_optimizer(cfg.optim.lr, total_steps, warmup_ratio=cfg.optim.warmup_ratio,
                                   weight_decay=cfg.optim.weight_decay, clip_norm=cfg.optim.clip_norm or None)
  init = lambda p: train_step.init_state(p, optimizer, mesh, cfg.seed, dtype=np.dtype(cfg.param_dtype))
  with jax.set_mesh(mesh):
    state = jax.eval_shape(init, trainable) if abstract else init(trainable)
    step_fn = train_step.jit_train_step(graphdef, optimizer, state, frozen, mesh, accum_steps=cfg.accum_steps)
  return graphdef, frozen, state, step_fn


def global_rows(cfg, mesh) -> int:
  """The rows of one step across the mesh: per device x data-parallel devices x accumulation."""
  return cfg.per_device_batch * mesh.shape["data"] * mesh.shape["fsdp"] * cfg.accum_steps
