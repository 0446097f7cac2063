"""What the command-line programs share (infer.py, eval.py, serve.py, train.py): bad input as one `error:` line and exit
1, Ctrl-C as exit 130, the weight flags, and the compilation cache. Importing it loads no jax: they check their flags
before jax loads."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from absl import flags

INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)
CACHE_ENV = "AF3_JAX_COMPILATION_CACHE"  # the compilation cache's folder, or "off"


def weight_flags(values: flags.FlagValues = flags.FLAGS) -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """--dtype and --quantize, as infer.py, eval.py and serve.py load the model (`assistant.load`). The modes
  are `af3_jax.quantization.MODES`, written out here because the flags are parsed before jax loads."""
  dtype = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.",
                            flag_values=values)
  quantize = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: the decoder's linears as int8 weights "
                               "(half their memory; see README).", flag_values=values)
  return dtype, quantize


def compilation_cache_flag(values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """--compilation-cache, which `use_compilation_cache` reads (defined once per flag set: infer.py and train.py share
  absl's global one when both are imported)."""
  if "compilation-cache" in values:
    return flags.FlagHolder(values, values["compilation-cache"])
  return flags.DEFINE_string("compilation-cache", None, "A folder where compiled programs are kept between runs, so "
                             "that a second start compiles nothing; 'off' keeps none (default: $" + CACHE_ENV +
                             ", else $XDG_CACHE_HOME/af3-jax/compilation, ~/.cache when XDG_CACHE_HOME is unset).",
                             flag_values=values)


def use_compilation_cache(folder: str | None) -> Path | None:
  """Turns on jax's persistent compilation cache in `folder` (None: $AF3_JAX_COMPILATION_CACHE, else
  `default_cache_folder()`; "off": no cache), before anything compiles; returns the folder, or None.

  Every program is kept, however small or quick to compile: jax's defaults skip programs that compile
  in under a second, and a start compiles dozens of those. A folder given that cannot be made is an
  OSError (one `error:` line); the default one is skipped instead, as if "off".
  """
  import jax

  chosen = folder if folder is not None else os.environ.get(CACHE_ENV)
  if chosen is not None and chosen.strip().lower() in ("off", ""):
    jax.config.update("jax_enable_compilation_cache", False)  # also over jax's own JAX_COMPILATION_CACHE_DIR
    return None
  path = Path(chosen).expanduser() if chosen is not None else default_cache_folder()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    if chosen is not None:
      raise OSError(f"{path}: cannot make the compilation cache folder ({e.strerror or e}); give another "
                    f"--compilation-cache, or 'off'") from None
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor, and no override of it
  return path


def default_cache_folder() -> Path:
  """af3-jax/compilation under the user's cache folder: $XDG_CACHE_HOME, else ~/.cache."""
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "af3-jax" / "compilation"


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
