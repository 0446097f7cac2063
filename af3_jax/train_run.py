"""A training run's plumbing around `train_step`: processes, the run's settings and data checked
before anything heavy, the workdir's lock and its record of the run's settings, the model's trainable
split for a stage, and the finished model written out."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from af3_jax import files, lora, train_step, weights
from af3_jax.data.manifest import Sample, read_manifest
from af3_jax.models import layers
from af3_jax.pretrained import Model

TRAINER_STATE = "trainer_state.json"  # in a run's model/: the step it holds


def initialize_distributed() -> None:
  """Joins a multi-process run described by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (set them in every process); does nothing for a single process. Must run first."""
  n = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  if n > 1:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need it to talk
    # On by default: its notifier takes SIGTERM in any process to every process (train.py's stop).
    jax.config.update("jax_enable_preemption_service", True)
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                               process_id=int(os.environ["JAX_PROCESS_ID"]))


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


def check_workdir(workdir: Path) -> None:
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"{workdir}: --workdir is a file, not a folder")


class WorkdirLock:
  """An exclusive `flock` on `workdir/.lock-<process>` (a context manager; creating it takes the lock):
  a second run on the same workdir is refused at once. The kernel drops the lock when its process
  dies, however it dies, so a killed run never leaves it stuck."""

  def __init__(self, workdir: Path):
    check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f".lock-{jax.process_index()}"
    self.file = open(path, "a+")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.seek(0)
      holder = self.file.read().strip() or "another process"
      self.file.close()
      raise ValueError(f"{workdir}: another train.py run ({holder}) is using this workdir; wait for it "
                       "or choose another --workdir") from None
    self.file.truncate(0)
    self.file.write(f"pid {os.getpid()}\n")
    self.file.flush()

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc) -> None:
    self.file.close()  # closing releases the lock


def record_settings(workdir: Path, cfg) -> list[str]:
  """Writes the run's settings to `workdir/train_config.json` (process 0) and returns those that
  differ from the settings recorded by the run before, as "name: old -> new" (a resumed run's warning)."""
  path = workdir / "train_config.json"
  settings = json.loads(cfg.to_json())
  new = traverse_util.flatten_dict(settings, sep=".")
  old = traverse_util.flatten_dict(json.loads(path.read_text()), sep=".") if path.is_file() else new
  changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
  if jax.process_index() == 0:
    files.write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
  return changed


def resolve_init(init_from: str) -> str:
  """The checkpoint folder to start from: a previous stage's workdir means its finished `model/`;
  anything else is what from_pretrained reads (a folder, or a hub id fetched here). Raises when it is
  no checkpoint, before any weight is read."""
  path = Path(init_from)
  if (path / "checkpoints").is_dir():
    if not (path / "model").is_dir():
      raise ValueError(f"{path}: a training workdir with no finished model/ yet; finish that run first")
    path = path / "model"
  root = weights.resolve(path)
  weights.layout(root)
  return str(root)


def prepare(model: Model, trainable: str, adapter: lora.Spec | None = None,
            seed: int = 0) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, frozen rest) for a stage's trainable set (`train_step.TRAINABLE`),
  with a new LoRA `adapter` added first (the "lora" stage), initialised from `seed`."""
  module = model.module()
  if adapter is not None:
    lora.add(module, adapter, jax.random.key(seed))
  return train_step.split(module, trainable)


def count(state: nnx.State) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def all_hosts_sum(n: int) -> int:
  """The sum of `n` over every process (a per-host count, like skipped samples)."""
  if jax.process_count() == 1:
    return n
  return int(multihost_utils.process_allgather(np.int32(n)).sum())


def merged_state(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State) -> nnx.State:
  """The whole model's state with trained params in the frozen weights' dtype and LoRA merged away."""
  dtypes = {k: x.dtype for k, x in traverse_util.flatten_dict(nnx.to_pure_dict(frozen)).items()}
  module = nnx.merge(graphdef, params, frozen)
  lora.merge_into(module)
  state = nnx.state(module)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  dtype = next(iter(dtypes.values()), jnp.float32)  # trained params go back to the model's dtype
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({k: x.astype(dtypes.get(k, dtype))
                                                                for k, x in flat.items()}))
  return state


def model_step(workdir: Path) -> int | None:
  """The training step `workdir/model` holds, or None when there is no finished model."""
  path = workdir / "model" / TRAINER_STATE
  return json.loads(path.read_text())["step"] if path.is_file() else None


def write_model(workdir: Path, step: int, model: Model, graphdef: nnx.GraphDef, params: nnx.State,
                frozen: nnx.State, adapter: lora.Spec | None = None) -> None:
  """`workdir/model`: the model at `step` in from_pretrained's layout (LoRA merged), with the step in
  its `trainer_state.json` and the tokenizer, generation and processor files of the model it started
  from; when the run trained a LoRA `adapter`, also `workdir/adapter`, the LoRA alone as a PEFT adapter.

  Both replace what a shorter earlier run left there. Each is written beside its place, then swapped
  in by two renames, so an interruption leaves the old folder, or the new one, never a mix.
  """
  side_files = weights.tokenizer_dir(model.path)
  primary = jax.process_index() == 0
  writes = [("model", lambda dst: weights.save_model(dst, model.config, merged_state(graphdef, params, frozen),
                                                     side_files))]
  if adapter is not None:
    writes.append(("adapter", lambda dst: lora.write_peft(dst, params, adapter)))
  for name, write in writes:
    new, old, dst = workdir / f".{name}.new", workdir / f".{name}.old", workdir / name
    if primary:
      for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    weights.sync_processes(f"write_{name}_start")
    write(new)
    if primary:
      if name == "model":
        (new / TRAINER_STATE).write_text(json.dumps({"step": step}) + "\n")
      if dst.exists():
        dst.rename(old)
      new.rename(dst)
      shutil.rmtree(old, ignore_errors=True)
    weights.sync_processes(f"write_{name}_done")


def memory_plan(compiled) -> dict[str, float] | None:
  """A compiled step's memory per device in GiB, as XLA planned it (None where the backend does not
  say): arguments, temporaries and the peak (arguments + outputs - donated buffers + temporaries)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return {"arguments_gib": m.argument_size_in_bytes / 2**30, "temporaries_gib": m.temp_size_in_bytes / 2**30,
          "peak_gib": peak / 2**30}


def memory_summary(plan: dict[str, float] | None) -> str:
  """`memory_plan`'s figures as one line."""
  if plan is None:
    return "memory analysis not available on this backend"
  return (f"arguments {plan['arguments_gib']:.2f} GiB, temporaries {plan['temporaries_gib']:.2f} GiB, "
          f"peak {plan['peak_gib']:.2f} GiB per device")
