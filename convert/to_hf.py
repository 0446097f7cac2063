"""Exports a training run at any saved step to transformers' layout, or its LoRA as a PEFT adapter.

  python -m convert.to_hf --workdir runs/stage5 --out af3-stage5-hf [--step=N] [--dtype=bfloat16|float32|float16]
  python -m convert.to_hf --workdir runs/stage4 --out think-adapter --adapter-only [--step=N]

`--step` defaults to the latest step saved: the finished run's `model/`, or the last checkpoint of a
run still under way or stopped. A checkpoint holds only what its stage trains; the rest comes from the
checkpoint the run started from (recorded in its `train_config.json`). The full export is
`model.safetensors` (shards of at most 5 GB plus an index), `config.json`, and the tokenizer,
generation and processor files the run started from; LoRA is merged. Tensors keep the dtype the run
keeps its model in (its compute_dtype; float32 stays float32) unless `--dtype` chooses another;
config.json's "dtype" names it. It loads with `AudioFlamingo3ForConditionalGeneration.from_pretrained(OUT)`.
The workdir is only read. The output is written to a temporary sibling folder and renamed when
complete; an existing OUT is never touched.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from af3_jax import lora, names, train_run, weights

SHARD_BYTES = 5 * 2**30


def tensors(state: nnx.State):
  """(module-tree key, numpy tensor in torch layout) for every parameter, one layer at a time."""
  for path, x in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items():
    for layer in names.layers_of(path, x.shape):
      canon = names.hf_key(path, layer)
      value = np.asarray(jax.device_get(x[layer] if layer is not None else x))
      yield names.module_tree_key(canon), np.ascontiguousarray(names.ours_to_torch(value, names.param_path(canon)[2]))


def write_safetensors(state: nnx.State, dst: Path) -> None:
  """Shards of at most SHARD_BYTES and, when there are several, `model.safetensors.index.json`."""
  shards, current, size = [], {}, 0
  for key, value in tensors(state):
    if current and size + value.nbytes > SHARD_BYTES:
      shards.append(current)
      current, size = {}, 0
    current[key] = value
    size += value.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], dst / "model.safetensors", metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards, 1):
    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, dst / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
  index = {"metadata": {"total_size": sum(v.nbytes for s in shards for v in s.values())}, "weight_map": weight_map}
  (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_adapter(workdir: Path, source: Path, dst: Path) -> None:
  """The LoRA of the run's model at `source` (`train_run.saved_model`) as a PEFT adapter folder."""
  found = train_run.step_of(source)
  if found is None:  # the finished model/: its adapter/ was written beside it
    if not (workdir / "adapter").is_dir():
      raise ValueError(f"{workdir}: has no adapter/ (only a LoRA run writes one)")
    shutil.copytree(workdir / "adapter", dst)
    return
  saved = train_run.load_step(*found, dtype=train_run.saved_dtype(source))
  if saved.adapter is None:
    raise ValueError(f"{workdir}: not a LoRA run (it trains {train_run.read_settings(workdir).trainable!r})")
  lora.write_peft(dst, saved.params, saved.adapter)


def write_hf_model(source: Path, dst: Path, dtype) -> None:
  """The run's model at `source` (`train_run.saved_model`) in transformers' layout, tensors in `dtype`
  (None: as the run keeps them)."""
  dtype = train_run.saved_dtype(source) if dtype is None else jnp.dtype(dtype)
  model = train_run.load_model(source, dtype=dtype)
  dst.mkdir()
  write_safetensors(model.state, dst)
  config = {**model.config.to_hf_dict(), "dtype": dtype.name}
  (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  weights.copy_side_files(weights.tokenizer_dir(model.path), dst)


def export(workdir: Path, out: Path, *, step: int | None, dtype, adapter_only: bool) -> None:
  """Writes the run's model at `step` (None: the latest saved; tensors in `dtype`, None: as the run
  keeps them) or its LoRA adapter to `out`."""
  if out.exists():
    raise ValueError(f"{out}: already exists; choose a new output folder")
  if not workdir.is_dir():
    raise ValueError(f"{workdir}: no such workdir")
  source = train_run.saved_model(workdir, step)
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
    dst = Path(tmp) / out.name
    if adapter_only:
      write_adapter(workdir, source, dst)
    else:
      write_hf_model(source, dst, dtype)
    dst.rename(out)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    export(Path(f.workdir), Path(f.out), step=f.step, dtype=f.dtype, adapter_only=f["adapter-only"].value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {f.out}")


if __name__ == "__main__":
  # Defined here, not at import: tests import `convert` beside infer.py and train.py.
  flags.DEFINE_string("workdir", None, "A train.py workdir.", required=True)
  flags.DEFINE_string("out", None, "The folder to write.", required=True)
  flags.DEFINE_integer("step", None, "The saved step to export (default: the latest).")
  flags.DEFINE_enum("dtype", None, ["bfloat16", "float32", "float16"],
                    "Tensor dtype to store (default: the dtype the run saved its model in).")
  flags.DEFINE_bool("adapter-only", False, "Write the run's LoRA as a PEFT adapter instead.")
  app.run(main)
