"""A training workdir: its lock, its record of the run's settings, the checkpoint a run starts from,
and which saved model (the finished `model/` or a step's checkpoint) a name means."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import jax
import ml_collections
from flax import traverse_util

from af3_jax import files
from af3_jax.checkpoints import locate
from af3_jax.training import checkpoint

TRAINER_STATE = "trainer_state.json"  # in a run's model/: the step it holds
CHECKPOINTS = "checkpoints"  # in a workdir: one folder per saved step (`checkpoint.Checkpointer`)
SETTINGS = "train_config.json"  # in a workdir: the run's settings (`record_settings`)


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
  settings = {**json.loads(cfg.to_json()), "init_checkpoint": init_checkpoint}
  new = traverse_util.flatten_dict(settings, sep=".")
  old = traverse_util.flatten_dict(_recorded(workdir) or settings, sep=".")
  changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
  if jax.process_index() == 0:
    files.write_text_atomic(workdir / SETTINGS, json.dumps(settings, indent=2) + "\n")
  return changed


def read_settings(workdir: Path) -> ml_collections.ConfigDict:
  """The settings `record_settings` wrote in a training workdir."""
  recorded = _recorded(workdir)
  if recorded is None:
    raise ValueError(f"{workdir}: no {SETTINGS}; not a train.py workdir")
  return ml_collections.ConfigDict(recorded)


def start_checkpoint(workdir: Path, init_from: str) -> str:
  """The checkpoint a run in `workdir` starts from: the one it recorded when it first started with this
  same `init_from`, else `resolve_init(init_from)`. A workdir named as init_from may save later steps
  while this run is stopped; resumed, it keeps the weights it started from."""
  recorded = _recorded(workdir) or {}
  if recorded.get("init_from") == init_from and recorded.get("init_checkpoint"):
    return resolve_init(recorded["init_checkpoint"])
  return resolve_init(init_from)


def _recorded(workdir: Path) -> dict | None:
  """The settings `record_settings` wrote in `workdir`, or None before a run's first start."""
  path = workdir / SETTINGS
  return json.loads(path.read_text()) if path.is_file() else None


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
  (`run.load_model` reads both). Raises naming the steps there are."""
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


def model_step(workdir: Path) -> int | None:
  """The training step `workdir/model` holds, or None when there is no finished model."""
  path = workdir / "model" / TRAINER_STATE
  return json.loads(path.read_text())["step"] if path.is_file() else None
