"""Our own checkpoints: a model folder with `config.json`, its parameters as an orbax tree under `params/`
and the tokenizer, generation and processor files it came with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from af3_jax.checkpoints.locate import INDEX, ORBAX_PARAMS
from af3_jax.config import AF3Config
from af3_jax.distributed import sync_processes

# Rewritten by whoever writes a model; trainer_state.json records a training run's step (trainer.py).
_MODEL_FILES = {"config.json", INDEX, "trainer_state.json"}


def save_model(dst: Path, config: AF3Config, state: nnx.State, files_from: Path) -> None:
  """Writes a folder `from_pretrained` reads: `config.json`, the parameters as an orbax tree under
  `params/`, and the tokenizer, generation and processor files found in `files_from`.

  It is written to `.<name>.partial` beside `dst` and renamed at the end, so an interrupted write never
  leaves a half-written `dst`; an existing `dst` is never overwritten. In a multi-process run every
  process calls this (orbax saves collectively, to a filesystem they share); the fixed temporary name
  lets them meet there, and process 0 alone writes the small files and renames.
  """
  import orbax.checkpoint as ocp

  if dst.exists():  # every process checks, and fails alike, before the first barrier
    raise ValueError(f"{dst}: already exists; choose a new output folder")
  tmp = dst.parent / f".{dst.name}.partial"
  primary = jax.process_index() == 0
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write
    tmp.mkdir(parents=True)
  sync_processes("save_model_start")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((tmp / ORBAX_PARAMS).absolute(), nnx.to_pure_dict(state))
  if primary:
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    copy_side_files(files_from, tmp)
    tmp.rename(dst)
  sync_processes("save_model_done")  # nobody reads dst before it is in place


def copy_side_files(src: Path, dst: Path) -> None:
  """The tokenizer, generation and processor files of a model folder (not its weights or config)."""
  for f in src.iterdir():
    if f.is_file() and f.name not in _MODEL_FILES and f.suffix != ".safetensors":
      shutil.copy2(f, dst / f.name)


def orbax_dtype(root: Path) -> np.dtype:
  """The dtype our orbax checkpoint stores its parameters in (the widest, if they differ), from its metadata."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata((root / ORBAX_PARAMS).absolute()).item_metadata
  dtypes = [leaf.dtype for leaf in jax.tree.leaves(tree)]
  if not dtypes:
    raise ValueError(f"{root / ORBAX_PARAMS}: not an orbax checkpoint (no parameter metadata)")
  return np.dtype(jnp.result_type(*dtypes))


def load_orbax(root: Path, abstract_state: nnx.State, shardings: nnx.State) -> nnx.State:
  """Restores our converted checkpoint into `abstract_state`'s dtypes and `shardings`."""
  import orbax.checkpoint as ocp

  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
  folder = (root / ORBAX_PARAMS).absolute()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      # Checked before reading: a restore that fails part-way leaves tensorstore's reads of the other
      # arrays running after it returns, to fail later against a closed event loop.
      _check_orbax_tree(ckptr.metadata(folder).item_metadata, target)
      restored = ckptr.restore(folder, target)
  except (ValueError, OSError) as e:  # a damaged tree, or one config.json does not describe
    raise ValueError(f"{root / ORBAX_PARAMS}: cannot restore this orbax checkpoint with {root / 'config.json'} "
                     f"({' '.join(str(e).split())})") from None
  nnx.replace_by_pure_dict(abstract_state, restored)
  return abstract_state


def _check_orbax_tree(saved, target) -> None:
  """Raises ValueError naming the parameters `target` lacks or has beyond the saved tree, and those
  whose saved shape differs."""
  shapes = lambda tree: {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)).items()}
  have, want = shapes(saved), shapes(target)
  missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
             ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + \
             [f"{k}: saved {have[k]}, config.json says {want[k]}" for k in sorted(have.keys() & want.keys())
              if have[k] != want[k]]
  if problems:
    raise ValueError("; ".join(problems))
