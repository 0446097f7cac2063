"""What the command-line programs share (infer.py, eval.py, serve.py, train.py): bad input as one `error:` line and exit
1, Ctrl-C as exit 130. Importing it loads no jax: they check their flags before jax loads."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import flags

INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)


def weight_flags(values: flags.FlagValues = flags.FLAGS) -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """--dtype and --quantize, as infer.py, eval.py and serve.py load the model (`assistant.load`). The modes
  are `af3_jax.quantization.MODES`, written out here because the flags are parsed before jax loads."""
  dtype = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.",
                            flag_values=values)
  quantize = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: the decoder's linears as int8 weights "
                               "(half their memory; see README).", flag_values=values)
  return dtype, quantize


def fail(message: object) -> NoReturn:
  # One write, newline included: print() and SystemExit write the newline apart, and a thread still
  # logging (grain's readers after a data error) could land between them, gluing its line to ours.
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(1)


def parse_flags(values: flags.FlagValues, argv: list[str]) -> list[str]:
  """absl's parsing of `values`, with a bad flag value or a stray argument as one `error:` line and exit 1."""
  try:
    rest = values(argv)
  except flags.Error as e:
    fail(e)
  if len(rest) > 1:
    fail(f"unexpected arguments: {' '.join(rest[1:])}")
  return rest


def exit_with(run: Callable[[], int]) -> NoReturn:
  """Exits with `run`'s status; a ValueError or OSError (bad input, a file that cannot be read or
  written) is one `error:` line and exit 1; Ctrl-C that `run` leaves (while jax or the model loads,
  when there is nothing to keep yet) is exit 130."""
  try:
    code = run()
  except (ValueError, OSError) as e:
    fail(e)
  except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    code = INTERRUPTED
  sys.exit(code)


def main(values: flags.FlagValues, doc: str, argv: list[str], run: Callable[[], int]) -> NoReturn:
  """A program on flags of its own (`values`, not absl's global set): --help prints `doc` and the flags,
  a bad flag is one `error:` line and exit 1; then `exit_with(run)`."""
  if any(a in ("-h", "--help") for a in argv[1:]):
    print(f"{doc}\n{values.get_help()}")
    sys.exit(0)
  parse_flags(values, argv)
  exit_with(run)
