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

import jax.numpy as jnp
from absl import flags

import cli
from af3_jax.checkpoints import locate, lora, orbax, safetensors
from af3_jax.training import run as train_run, workdirs

# Flags of their own, not absl's global set: tests import `convert` beside infer.py and train.py.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py workdir.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "The folder to write.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "The saved step to export (default: the latest).", flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32", "float16"],
                           "Tensor dtype to store (default: the dtype the run saved its model in).", flag_values=FLAGS)
_ADAPTER_ONLY = flags.DEFINE_bool("adapter-only", False, "Write the run's LoRA as a PEFT adapter instead.",
                                  flag_values=FLAGS)


def write_adapter(workdir: Path, source: Path, dst: Path) -> None:
  """The LoRA of the run's model at `source` (`workdirs.saved_model`) as a PEFT adapter folder."""
  found = workdirs.step_of(source)
  if found is None:  # the finished model/: its adapter/ was written beside it
    if not (workdir / "adapter").is_dir():
      raise ValueError(f"{workdir}: has no adapter/ (only a LoRA run writes one)")
    shutil.copytree(workdir / "adapter", dst)
    return
  saved = train_run.load_step(*found, dtype=train_run.saved_dtype(source))
  if saved.adapter is None:
    raise ValueError(f"{workdir}: not a LoRA run (it trains {workdirs.read_settings(workdir).trainable!r})")
  lora.write_peft(dst, saved.params, saved.adapter)


def write_hf_model(source: Path, dst: Path, dtype) -> None:
  """The run's model at `source` (`workdirs.saved_model`) in transformers' layout, tensors in `dtype`
  (None: as the run keeps them)."""
  dtype = train_run.saved_dtype(source) if dtype is None else jnp.dtype(dtype)
  model = train_run.load_model(source, dtype=dtype)
  dst.mkdir()
  safetensors.save_safetensors(model.state, dst)
  config = {**model.config.to_hf_dict(), "dtype": dtype.name}
  (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  orbax.copy_side_files(locate.tokenizer_dir(model.path), dst)


def export(workdir: Path, out: Path, *, step: int | None, dtype, adapter_only: bool) -> None:
  """Writes the run's model at `step` (None: the latest saved; tensors in `dtype`, None: as the run
  keeps them) or its LoRA adapter to `out`."""
  if out.exists():
    raise ValueError(f"{out}: already exists; choose a new output folder")
  if not workdir.is_dir():
    raise ValueError(f"{workdir}: no such workdir")
  source = workdirs.saved_model(workdir, step)
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
    dst = Path(tmp) / out.name
    if adapter_only:
      write_adapter(workdir, source, dst)
    else:
      write_hf_model(source, dst, dtype)
    dst.rename(out)


def run() -> int:
  if _WORKDIR.value is None or _OUT.value is None:
    raise ValueError("give --workdir (a train.py workdir) and --out (the folder to write)")
  export(Path(_WORKDIR.value), Path(_OUT.value), step=_STEP.value, dtype=_DTYPE.value, adapter_only=_ADAPTER_ONLY.value)
  print(f"wrote {_OUT.value}")
  return 0


def main(argv: list[str]) -> None:
  cli.main(FLAGS, __doc__, argv, run)


if __name__ == "__main__":
  cli.process(lambda: main(sys.argv))
