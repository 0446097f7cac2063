"""Converts an upstream checkpoint (any layout, local or hub) into our orbax layout for fast restarts.

  python -m convert.from_hf SRC DST [--dtype=bfloat16]

DST gets `config.json` (transformers form), the tokenizer / processor / generation files, and the
parameters as an orbax tree under `params/`. It is written to a temporary sibling and renamed at the
end, so an interrupted run never leaves a half-written DST; an existing DST is never overwritten.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
from absl import flags

import af3_jax
import cli
from af3_jax.checkpoints import locate, orbax

# Flags of their own, not absl's global set: tests import `convert` beside infer.py, which has a --dtype.
FLAGS = flags.FlagValues()
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Parameter dtype to store.",
                           flag_values=FLAGS)


def convert(src: str, dst: Path, dtype) -> None:
  if dst.exists():  # checked before the (long) load, and again by save_model
    raise ValueError(f"{dst}: already exists; choose a new output folder")
  model = af3_jax.from_pretrained(src, dtype=dtype)
  orbax.save_model(dst, model.config, model.state, locate.tokenizer_dir(model.path))


def run(src: str, dst: str) -> int:
  cli.note(f"loading {locate.resolve(src)} ...")  # a missing SRC fails here, in one line
  convert(src, Path(dst), jnp.dtype(_DTYPE.value))
  print(f"wrote {dst}")
  return 0


def main(argv: list[str]) -> None:
  cli.main(FLAGS, __doc__, argv, run, args=["SRC", "DST"])


if __name__ == "__main__":
  cli.process(lambda: main(sys.argv))
