"""A training run's model: the finished model written out (`write_model`), and the model at any saved
step read back (an export, or a run that starts from another's step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from af3_jax import distributed
from af3_jax.checkpoints import locate, lora, orbax
from af3_jax.checkpoints.pretrained import Model, from_pretrained
from af3_jax.training import checkpoint, step as train_step, workdirs


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
  run = workdirs.read_settings(workdir)
  base = load_model(_started_from(run), dtype=dtype, mesh=mesh, remat=remat)
  spec = train_step.lora_spec(run)
  graphdef, params, frozen = train_step.prepare(base, run.trainable, spec, run.seed)
  trained = np.dtype(run.param_dtype)  # what `train_step.init_state` trained them in
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, trained, sharding=x.sharding), params)
  params = checkpoint.restore_params(workdir / workdirs.CHECKPOINTS / str(step), abstract)
  return SavedStep(base, graphdef, params, frozen, spec)


def load_model(source: str | Path, *, dtype, mesh: jax.sharding.Mesh | None = None, remat: str = "none") -> Model:
  """The model at `source`, a checkpoint as `workdirs.resolve_init` or `workdirs.saved_model` name it: a folder through
  `from_pretrained`; a training step built in memory, its trained params merged (LoRA too) into the
  frozen weights of its run's init checkpoint (`merged_state`, as `write_model` saves them), whose
  tokenizer and processor files its `path` names."""
  found = workdirs.step_of(source)
  if found is None:
    return from_pretrained(source, dtype=dtype, mesh=mesh, remat=remat)
  saved = load_step(*found, dtype=dtype, mesh=mesh, remat=remat)
  b = saved.base
  return Model(b.config, b.graphdef, merged_state(saved.graphdef, saved.params, saved.frozen), b.mesh, b.path,
               b.generation)


def saved_dtype(source: str | Path) -> np.dtype:
  """The dtype a run's model at `source` (`workdirs.saved_model`) is kept in: its orbax `model/`'s, or for a
  step the run's compute_dtype (its frozen weights', which `write_model` would keep)."""
  found = workdirs.step_of(source)
  return np.dtype(workdirs.read_settings(found[0]).compute_dtype) if found else orbax.orbax_dtype(Path(source))


def base_checkpoint(source: str | Path) -> Path:
  """The checkpoint folder whose config.json and tokenizer `source` uses: itself, or for a training
  step that of its run's init checkpoint."""
  found = workdirs.step_of(source)
  if found is None:
    return Path(source)
  return base_checkpoint(_started_from(workdirs.read_settings(found[0])))


def _started_from(run: ml_collections.ConfigDict) -> str:
  """The checkpoint a run's recorded settings say it started from."""
  # Runs recorded before init_checkpoint existed name only the init_from they were given.
  return workdirs.resolve_init(run.get("init_checkpoint") or run.init_from)


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
        (new / workdirs.TRAINER_STATE).write_text(json.dumps({"step": step}) + "\n")
      if dst.exists():
        dst.rename(old)
      new.rename(dst)
      shutil.rmtree(old, ignore_errors=True)
    distributed.sync_processes(f"write_{name}_done")
