"""A training run's plumbing around `train_step`: processes, the run's settings and data checked
before anything heavy, the workdir's lock and its record of the run's settings, the model's trainable
split for a stage, the finished model written out, and the model at any saved step read back (an
export, or a run that starts from another's step)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from af3_jax import distributed, files
from af3_jax.checkpoints import locate, lora, orbax
from af3_jax.checkpoints.pretrained import Model, from_pretrained
from af3_jax.data.manifest import Sample, read_manifest
from af3_jax.models import layers
from af3_jax.training import checkpoint, step as train_step

TRAINER_STATE = "trainer_state.json"  # in a run's model/: the step it holds
CHECKPOINTS = "checkpoints"  # in a workdir: one folder per saved step (`checkpoint.Checkpointer`)
SETTINGS = "train_config.json"  # in a workdir: the run's settings (`record_settings`)


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


def record_settings(workdir: Path, cfg, init_checkpoint: str) -> list[str]:
  """Writes the run's settings to `workdir/train_config.json` (process 0), with `init_checkpoint`, the
  checkpoint its `init_from` named (`start_checkpoint`), and returns those that differ from the
  settings recorded by the run before, as "name: old -> new" (a resumed run's warning)."""
  path = workdir / SETTINGS
  settings = {**json.loads(cfg.to_json()), "init_checkpoint": init_checkpoint}
  new = traverse_util.flatten_dict(settings, sep=".")
  old = traverse_util.flatten_dict(json.loads(path.read_text()), sep=".") if path.is_file() else new
  changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
  if jax.process_index() == 0:
    files.write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
  return changed


def read_settings(workdir: Path) -> ml_collections.ConfigDict:
  """The settings `record_settings` wrote in a training workdir."""
  path = workdir / SETTINGS
  if not path.is_file():
    raise ValueError(f"{workdir}: no {SETTINGS}; not a train.py workdir")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def start_checkpoint(workdir: Path, init_from: str) -> str:
  """The checkpoint a run in `workdir` starts from: the one it recorded when it first started with this
  same `init_from`, else `resolve_init(init_from)`. A workdir named as init_from may save later steps
  while this run is stopped; resumed, it keeps the weights it started from."""
  path = workdir / SETTINGS
  recorded = json.loads(path.read_text()) if path.is_file() else {}
  if recorded.get("init_from") == init_from and recorded.get("init_checkpoint"):
    return resolve_init(recorded["init_checkpoint"])
  return resolve_init(init_from)


def resolve_init(init_from: str) -> str:
  """The checkpoint to start from, as an absolute path: for a training workdir, its latest model
  (`saved_model`: the finished `model/`, or the last step an unfinished run saved); for a step's folder
  `W/checkpoints/<step>`, that step; anything else is what from_pretrained reads (a folder, or a hub
  id fetched here). Raises when it is no checkpoint, before any weight is read."""
  path = Path(init_from)
  if (found := step_of(path)) or (path / CHECKPOINTS).is_dir():
    path = saved_model(*found) if found else saved_model(path)
    if step_of(path):
      return str(path.absolute())
  root = locate.resolve(path)
  locate.layout(root)
  return str(root.absolute())


def step_of(source: str | Path) -> tuple[Path, int] | None:
  """(workdir, step) when `source` is a training step's checkpoint folder `workdir/checkpoints/<step>`;
  None for any other checkpoint."""
  path = Path(source)
  return (path.parent.parent, int(path.name)) if path.parent.name == CHECKPOINTS and path.name.isdigit() else None


def saved_model(workdir: Path, step: int | None = None) -> Path:
  """Where training workdir `workdir` keeps its model at `step` (None: the latest step saved):
  `workdir/model` when the finished run wrote it at that step, else that step's checkpoint folder
  (`load_model` reads both). Raises naming the steps there are."""
  finished = model_step(workdir)
  saved = checkpoint.saved_steps(workdir / CHECKPOINTS)
  steps = sorted(set(saved) | ({finished} - {None}))
  step = steps[-1] if step is None and steps else step
  if step is not None and step == finished:
    return workdir / "model"
  if step in saved:
    return workdir / CHECKPOINTS / str(step)
  there = f"saved steps: {', '.join(map(str, steps))}" if steps else "no step saved yet"
  raise ValueError(f"{workdir}: " + (f"no saved step {step}; {there}" if step is not None else there))


class SavedStep(NamedTuple):
  """A training step read back: the model its run started from, the run's trainable split over it
  with the step's trainable params, and the run's LoRA shape (None: no LoRA)."""

  base: Model
  graphdef: nnx.GraphDef
  params: nnx.State
  frozen: nnx.State
  adapter: lora.Spec | None


def load_step(workdir: Path, step: int, *, dtype, mesh: jax.sharding.Mesh | None = None,
              remat: str = "none") -> SavedStep:
  """Training workdir `workdir` at its saved `step`: its recorded settings split the model of its
  init checkpoint (loaded in `dtype`) as the run did, and the step's checkpoint fills the trainable
  part (the params alone: no optimizer state, no data position)."""
  run = read_settings(workdir)
  base = load_model(_started_from(run), dtype=dtype, mesh=mesh, remat=remat)
  spec = lora_spec(run)
  graphdef, params, frozen = prepare(base, run.trainable, spec, run.seed)
  trained = np.dtype(run.param_dtype)  # what `train_step.init_state` trained them in
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, trained, sharding=x.sharding), params)
  params = checkpoint.restore_params(workdir / CHECKPOINTS / str(step), abstract)
  return SavedStep(base, graphdef, params, frozen, spec)


def load_model(source: str | Path, *, dtype, mesh: jax.sharding.Mesh | None = None, remat: str = "none") -> Model:
  """The model at `source`, a checkpoint as `resolve_init` or `saved_model` name it: a folder through
  `from_pretrained`; a training step built in memory, its trained params merged (LoRA too) into the
  frozen weights of its run's init checkpoint (`merged_state`, as `write_model` saves them), whose
  tokenizer and processor files its `path` names."""
  found = step_of(source)
  if found is None:
    return from_pretrained(source, dtype=dtype, mesh=mesh, remat=remat)
  saved = load_step(*found, dtype=dtype, mesh=mesh, remat=remat)
  b = saved.base
  return Model(b.config, b.graphdef, merged_state(saved.graphdef, saved.params, saved.frozen), b.mesh, b.path,
               b.generation)


def saved_dtype(source: str | Path) -> np.dtype:
  """The dtype a run's model at `source` (`saved_model`) is kept in: its orbax `model/`'s, or for a
  step the run's compute_dtype (its frozen weights', which `write_model` would keep)."""
  found = step_of(source)
  return np.dtype(read_settings(found[0]).compute_dtype) if found else orbax.orbax_dtype(Path(source))


def base_checkpoint(source: str | Path) -> Path:
  """The checkpoint folder whose config.json and tokenizer `source` uses: itself, or for a training
  step that of its run's init checkpoint."""
  found = step_of(source)
  if found is None:
    return Path(source)
  return base_checkpoint(_started_from(read_settings(found[0])))


def _started_from(run: ml_collections.ConfigDict) -> str:
  """The checkpoint a run's recorded settings say it started from."""
  # Runs recorded before init_checkpoint existed name only the init_from they were given.
  return resolve_init(run.get("init_checkpoint") or run.init_from)


def lora_spec(cfg) -> lora.Spec | None:
  """The LoRA a stage trains (its "lora" trainable set), or None."""
  return lora.Spec(cfg.lora.rank, cfg.lora.alpha) if cfg.trainable == "lora" else None


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
  side_files = locate.tokenizer_dir(model.path)
  primary = jax.process_index() == 0
  writes = [("model", lambda dst: orbax.save_model(dst, model.config, merged_state(graphdef, params, frozen),
                                                     side_files))]
  if adapter is not None:
    writes.append(("adapter", lambda dst: lora.write_peft(dst, params, adapter)))
  for name, write in writes:
    new, old, dst = workdir / f".{name}.new", workdir / f".{name}.old", workdir / name
    if primary:
      for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    distributed.sync_processes(f"write_{name}_start")
    write(new)
    if primary:
      if name == "model":
        (new / TRAINER_STATE).write_text(json.dumps({"step": step}) + "\n")
      if dst.exists():
        dst.rename(old)
      new.rename(dst)
      shutil.rmtree(old, ignore_errors=True)
    distributed.sync_processes(f"write_{name}_done")


def memory_plan(compiled, capacity: int | None = None) -> dict[str, float] | None:
  """A compiled step's memory per device in GiB, as XLA planned it (None where the backend does not
  say): arguments, temporaries and the peak (arguments + outputs - donated buffers + temporaries);
  with the device's `capacity` in bytes, also that (`device_gib`) and the share of it left free."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  plan = {"arguments_gib": m.argument_size_in_bytes / 2**30, "temporaries_gib": m.temp_size_in_bytes / 2**30,
          "peak_gib": peak / 2**30}
  if capacity:
    plan.update(device_gib=capacity / 2**30, headroom=1 - peak / capacity)
  return plan


def compiled_plan(lowered, capacity: int | None = None) -> dict | None:
  """`memory_plan` of a lowered step once compiled. A compiler that refuses a program too big for the
  device (TPU's does, naming the sizes) gives `{"error": its reason}` instead: a plan's answer too."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"error": " ".join(str(e).split())}
  return memory_plan(compiled, capacity)


def fits(plan: dict | None) -> bool:
  """Whether a `compiled_plan` fits its device (True where the capacity is unknown)."""
  return plan is not None and "error" not in plan and plan.get("headroom", 0) >= 0


def memory_summary(plan: dict | None) -> str:
  """`memory_plan`'s or `compiled_plan`'s figures as one line."""
  if plan is None:
    return "memory analysis not available on this backend"
  if "error" in plan:
    return f"does not fit: {plan['error']}"
  line = (f"arguments {plan['arguments_gib']:.2f} GiB, temporaries {plan['temporaries_gib']:.2f} GiB, "
          f"peak {plan['peak_gib']:.2f} GiB per device")
  if "device_gib" in plan:
    free = plan["headroom"]
    line += f" of {plan['device_gib']:.1f} GiB: " + (f"{free:.0%} free" if free >= 0 else "does not fit")
  return line
