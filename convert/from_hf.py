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
from absl import app, flags, logging

import af3_jax
from af3_jax import weights


def convert(src: str, dst: Path, dtype) -> None:
  if dst.exists():  # checked before the (long) load, and again by save_model
    raise ValueError(f"{dst}: already exists; choose a new output folder")
  model = af3_jax.from_pretrained(src, dtype=dtype)
  weights.save_model(dst, model.config, model.state, weights.tokenizer_dir(model.path))


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError("usage: python -m convert.from_hf SRC DST [--dtype=bfloat16|float32|float16]")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  try:
    convert(argv[1], Path(argv[2]), jnp.dtype(flags.FLAGS.dtype))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {argv[2]}")


if __name__ == "__main__":
  # Defined here, not at import: tests import `convert` beside infer.py, which has its own --dtype.
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Parameter dtype to store.")
  app.run(main)
