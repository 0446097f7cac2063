"""What the command-line programs share (infer.py, eval.py, serve.py, train.py, convert/): bad input as one
`error:` line and exit 1, Ctrl-C as exit 130, the weight flags, the compilation cache, and quiet logs:
libraries' INFO lines hidden unless asked (`--verbosity 0`, or AF3_VERBOSITY=0 in the environment), each
warning one `warning: ...` line. Importing it loads no jax: they check their flags before jax loads."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from absl import flags
from absl import logging as absl_logging

INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)
CACHE_ENV = "AF3_JAX_COMPILATION_CACHE"  # the compilation cache's folder, or "off"
VERBOSITY_ENV = "AF3_VERBOSITY"  # the default of --verbosity
_VERBOSITY_HELP = ("-1: only warnings and errors; 0: also the libraries' INFO lines (jax, orbax, absl); 1: debug. "
                   f"Default: ${VERBOSITY_ENV}, else -1.")
# absl's own --verbosity (global flags: infer.py, train.py), listed by their --help once they adopt this
# module's key flags.
flags.declare_key_flag("verbosity")


def weight_flags(values: flags.FlagValues = flags.FLAGS) -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """--dtype and --quantize, as infer.py, eval.py and serve.py load the model (`assistant.load`). The modes
  are `af3_jax.checkpoints.quantization.MODES`, written out here because the flags are parsed before jax loads."""
  dtype = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.",
                            flag_values=values)
  quantize = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: the decoder's linears as int8 weights "
                               "(half their memory; see docs/inference.md).", flag_values=values)
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
  jax.config.update("jax_enable_compilation_cache", True)  # after an "off" earlier in this process
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor, and no override of it
  return path


def default_cache_folder() -> Path:
  """af3-jax/compilation under the user's cache folder: $XDG_CACHE_HOME, else ~/.cache."""
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "af3-jax" / "compilation"


def verbosity_flag(values: flags.FlagValues) -> None:
  """--verbosity for a program on flags of its own (absl's global set has its own, with the same scale)."""
  flags.DEFINE_integer("verbosity", -1, _VERBOSITY_HELP, flag_values=values)


def setup_logging(values: flags.FlagValues = flags.FLAGS) -> None:
  """Hides the libraries' INFO lines (absl, orbax, jax's "Unable to initialize backend 'tpu'",
  transformers' advice) unless --verbosity or $AF3_VERBOSITY asks for them, and writes each log record
  at WARNING and above, and each Python warning, as one line: `warning: ...`. Called once the flags
  are parsed, before jax or transformers load."""
  given = "verbosity" in values and values["verbosity"].present
  try:
    verbosity = values["verbosity"].value if given else int(os.environ.get(VERBOSITY_ENV, "-1"))
  except ValueError:
    fail(f"{VERBOSITY_ENV}={os.environ[VERBOSITY_ENV]!r}: must be an integer (-1, 0 or 1)")
  level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
  if verbosity < 0:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found", torch being optional
  absl_logging.set_verbosity(verbosity)
  root = logging.getLogger()
  root.setLevel(level)
  for handler in [h for h in root.handlers if isinstance(h, (absl_logging.ABSLHandler, _Lines))]:
    root.removeHandler(handler)
  root.addHandler(_Lines(verbose=verbosity >= 0))
  warnings.showwarning = _show_warning


class _Lines(logging.Handler):
  """One line per record on the current stderr (whatever it is by then: tests capture it): `warning:
  message`; verbose, with the logger's name (`info: orbax...: message`)."""

  def __init__(self, verbose: bool):
    super().__init__()
    self.verbose = verbose

  def emit(self, record: logging.LogRecord) -> None:
    try:
      message = " ".join(record.getMessage().split())
      where = f"{record.name}: " if self.verbose else ""
      sys.stderr.write(f"{record.levelname.lower()}: {where}{message}\n")
    except Exception:  # noqa: BLE001: logging must never raise into the program
      self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
  """A Python warning as one line, without the source line `warnings` would print under it."""
  (file or sys.stderr).write(f"warning: {' '.join(str(message).split())}\n")


def weights_label(dtype: str, quantize: str, think: bool) -> str:
  """How the weight flags load a model, for the line saying what loads: "bfloat16, int8, think adapter"."""
  return ", ".join([dtype, *([quantize] if quantize != "none" else []), *(["think adapter"] if think else [])])


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
  """Says that `what` loads, and when it has, in how long."""
  started = time.perf_counter()
  note(f"loading {what} ...")
  yield
  note(f"loaded in {time.perf_counter() - started:.1f} s")


def note(message: str) -> None:
  """A line about what the program is doing (loading, compiling, what is left), on stderr: stdout holds
  the answers."""
  sys.stderr.write(f"{message}\n")
  sys.stderr.flush()


def fail(message: object) -> NoReturn:
  # One write, newline included: print() and SystemExit write the newline apart, and a thread still
  # logging (grain's readers after a data error) could land between them, gluing its line to ours.
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(1)


def parse_flags(values: flags.FlagValues, argv: list[str], args: Sequence[str] = ()) -> list[str]:
  """absl's parsing of `values`, with a bad flag value, a missing positional argument (`args` names
  them) or a stray one as one `error:` line and exit 1. Returns the program name and the arguments."""
  try:
    rest = values(argv)
  except flags.Error as e:
    fail(e)
  if len(rest) - 1 > len(args):
    fail(f"unexpected arguments: {' '.join(rest[1 + len(args):])}")
  if len(rest) - 1 < len(args):
    fail(f"give {' '.join(args[len(rest) - 1:])} (see --help)")
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


def process(main: Callable[[], object]) -> NoReturn:
  """Runs a program's `main` as the process (its `__main__` block; tests call `main` itself). Exiting
  interrupted (130), it leaves without the interpreter's teardown: Ctrl-C may have cut an XLA compile
  short, whose threads then crash the teardown (a segfault, not 130). By then the program has closed
  what it writes."""
  try:
    main()
  except SystemExit as e:
    if e.code != INTERRUPTED:
      raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)
  sys.exit(0)


def main(values: flags.FlagValues, doc: str, argv: list[str], run: Callable[..., int],
         args: Sequence[str] = ()) -> NoReturn:
  """A program on flags of its own (`values`, not absl's global set; --verbosity is added to them) and
  the positional arguments `args` names: --help prints `doc` and the flags, a bad flag is one `error:`
  line and exit 1; then `setup_logging` and `exit_with(run(*arguments))`."""
  if "verbosity" not in values:
    verbosity_flag(values)
  if any(a in ("-h", "--help") for a in argv[1:]):
    print(f"{doc}\n{values.get_help()}")
    sys.exit(0)
  arguments = parse_flags(values, argv, args)[1:]
  setup_logging(values)
  exit_with(lambda: run(*arguments))
