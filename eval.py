"""Score Audio Flamingo 3 on a benchmark by the benchmark's own rules, with its settings and throughput.

  python eval.py --task mmau --data mmau-test-mini.json --model PATH_OR_HUB_ID --out runs/mmau
  python eval.py --rescore runs/mmau        # summary.json again from an edited predictions.json

Tasks: mmau, mmar, asr, aqa, manifest (af3_jax/evaluation/tasks.py). OUT (made with its parents if
needed) gets predictions.json (the benchmark's items with the answers where its official scorer reads
them) and summary.json. A rerun resumes by item id. The exit status is 1 when an item failed (its audio
missing, say; --retry-errors answers it again once fixed), as for `infer.py --batch`. Several processes
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, as for train.py, with OUT on a filesystem
they share) split the items; process 0 writes the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

import cli

# Flags of their own, not absl's global set: infer.py defines the same names, and tests load both.
FLAGS = flags.FlagValues()
TASKS = ["mmau", "mmar", "asr", "aqa", "manifest"]  # af3_jax.evaluation.tasks.TASKS, named before jax loads
_TASK = flags.DEFINE_enum("task", None, TASKS, "The benchmark's format and scorer.", flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", None, "The benchmark file: JSON, or JSON lines (.jsonl).", flag_values=FLAGS)
_AUDIO_ROOT = flags.DEFINE_string("audio-root", None, "Where the items' audio paths start (default: the data "
                                  "file's folder).", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", "nvidia/audio-flamingo-3-hf", "Checkpoint folder or hub id.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "The run's folder: predictions.json, summary.json and its progress.",
                           flag_values=FLAGS)
_THINK = flags.DEFINE_bool("think", False, "Think mode: the checkpoint's think/ (or stage35/) adapter and the "
                           "think suffix on every prompt.", flag_values=FLAGS)
_LIMIT = flags.DEFINE_integer("limit", None, "Only the first N items.", lower_bound=1, flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 8, "Requests decoded together (the engine's slots).", lower_bound=1, flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max-new-tokens", 128, "At most this many new tokens per answer (NVIDIA's eval "
                                "scripts: 128).", lower_bound=1, flag_values=FLAGS)
_TEMPLATE = flags.DEFINE_string("prompt-template", None, "The prompt, with {question}, {options} ('(A) ...' "
                                "lines) and {choices} (plain lines) as the task allows; \\n is a newline "
                                "(default: the task's).", flag_values=FLAGS)
_STYLE = flags.DEFINE_enum("style", None, ["hf", "nvidia"], "Prompt style (see docs/inference.md); default: the one the "
                           "checkpoint was trained with, nvidia for AF3 (how the paper's numbers were made), hf for "
                           "Music Flamingo.", flag_values=FLAGS)
_DTYPE, _QUANTIZE = cli.weight_flags(FLAGS)
_CACHE = cli.compilation_cache_flag(FLAGS)
_RETRY = flags.DEFINE_bool("retry-errors", False, "Answer again the items that failed (a missing audio "
                           "file since put back).", flag_values=FLAGS)
_RESCORE = flags.DEFINE_string("rescore", None, "Recompute OUT/summary.json from OUT/predictions.json; "
                               "takes only --task besides.", flag_values=FLAGS)

def _check_flags() -> None:
  """Refuses what cannot work, before jax or the model loads."""
  if _RESCORE.value is not None:
    given = [f"--{name}" for name in FLAGS if FLAGS[name].present and name not in ("rescore", "task")]
    if given:
      raise ValueError(f"--rescore takes only --task besides; drop {', '.join(sorted(given))}")
    return
  missing = [f"--{f.name}" for f in (_TASK, _DATA, _OUT) if f.value is None]
  if missing:
    raise ValueError(f"give {' and '.join(missing)} (or --rescore OUT)")
  data = Path(_DATA.value)
  if not data.is_file():
    raise ValueError(f"{data}: {'is a folder; --data takes a file' if data.is_dir() else 'no such data file'}")


def _settings() -> dict:
  """What the answers depend on (recorded in run.json and summary.json), and what paces the run; the
  style is filled in by `run`."""
  from af3_jax.evaluation import tasks

  data = Path(_DATA.value).resolve()
  model = Path(_MODEL.value)
  template = _TEMPLATE.value.replace("\\n", "\n") if _TEMPLATE.value is not None else tasks.TASKS[_TASK.value].template
  # Recorded only when on, so that runs made before --quantize existed still resume.
  quantize = {"quantize": _QUANTIZE.value} if _QUANTIZE.value != "none" else {}
  return {"task": _TASK.value, "data": str(data),
          "audio_root": str(Path(_AUDIO_ROOT.value).resolve() if _AUDIO_ROOT.value else data.parent),
          "model": str(model.resolve()) if model.exists() else _MODEL.value, "prompt_template": template,
          "style": _STYLE.value, "dtype": _DTYPE.value, "think": _THINK.value,
          "decoding": {"greedy": True, "repetition_penalty": 1.0, "max_new_tokens": _MAX_NEW.value},
          "limit": _LIMIT.value, "batch_size": _BATCH_SIZE.value, **quantize}


def _style() -> str:
  """--style, or the checkpoint family's own (its config.json is read: the model folder must be there)."""
  from af3_jax import processor, weights

  return _STYLE.value or processor.FAMILIES[weights.model_type(weights.resolve(_MODEL.value))].styles[0]


def _load_assistant(style: str):
  """The model and processor as an Assistant that decodes greedily with no repetition penalty (NVIDIA's
  eval decodes greedily; transformers' generation_config.json would sample with a penalty of 1.05)."""
  import jax

  from af3_jax import assistant, sharding, weights

  root = weights.resolve(_MODEL.value)
  with cli.loading(f"{root} ({cli.weights_label(_DTYPE.value, _QUANTIZE.value, _THINK.value)})"):
    # Each process answers on its own first device (jax.devices()[0] is process 0's in a multi-process run).
    model, processor = assistant.load(root, dtype=_DTYPE.value, think=_THINK.value, style=style,
                                      quantize=_QUANTIZE.value, mesh=sharding.single_device_mesh(jax.local_devices()[0]))
  cli.note("each new prompt size compiles once, before its first answer")
  return assistant.Assistant(model, processor, max_new_tokens=_MAX_NEW.value, think=_THINK.value, do_sample=False,
                             repetition_penalty=1.0)


def _report(summary: dict, out: Path) -> str:
  """The summary in one line."""
  score = next((f"{k} {summary[k]:.2f}%" for k in ("accuracy", "wer", "exact_match") if summary.get(k) is not None),
               "no score")
  speed = summary.get("throughput") or {}
  pace = f"; {speed['items_per_s']:.2f} items/s, RTFx {speed['rtfx']:.1f}" if speed.get("items_per_s") else ""
  unscored = f"; {summary['no_reference']} answered without a reference" if summary.get("no_reference") else ""
  return (f"{summary['task']}: {score} over {summary['n']} scored of {summary['items']} items "
          f"({summary['errors']} errors{unscored}){pace} -> {out / 'summary.json'}")


def _failed(errors: int, out: Path) -> int:
  """The exit status for a run whose items include `errors` failed ones (0 or 1), said in a line."""
  if errors:
    cli.note(f"{errors} item(s) failed (their messages are under 'error' in {out / 'predictions.json'}); fix "
             "them (a missing audio file, say) and rerun with --retry-errors")
  return 1 if errors else 0


def run() -> int:
  """Evaluates, or rescores, as the flags say; returns the exit status."""
  _check_flags()
  from af3_jax.evaluation import runner

  if _RESCORE.value is not None:
    out = Path(_RESCORE.value)
    print(_report(runner.rescore(out, _TASK.value), out))
    return 0
  cli.use_compilation_cache(_CACHE.value)
  import jax

  from af3_jax import train_run
  from af3_jax.config import read_json
  from af3_jax.evaluation import tasks

  settings = _settings()
  train_run.initialize_distributed()
  process, count = jax.process_index(), jax.process_count()
  benchmark = tasks.load(_TASK.value, _DATA.value, settings["audio_root"], settings["prompt_template"], _LIMIT.value)
  settings["style"] = _style()  # after the data file, whose errors come first: this reads the checkpoint
  out = Path(_OUT.value)
  run_dir = runner.Run(out, benchmark, settings, process)
  if run_dir.finished(_RETRY.value):
    cli.note(f"{out}: every item has its record and the files are written; nothing to do")
    return _failed(read_json(out / runner.SUMMARY)["errors"], out)
  todo = run_dir.todo(process, count, _RETRY.value)
  session = runner.Throughput()
  if todo:
    bot = _load_assistant(settings["style"])
    try:
      session = run_dir.answer(todo, lambda prompts: runner.answer(bot, prompts, _BATCH_SIZE.value), process)
    except KeyboardInterrupt:
      print(f"\ninterrupted; answers so far are kept in {out}: rerun the same command to resume", file=sys.stderr)
      return cli.INTERRUPTED
  sessions = runner.gather(session)
  if process != 0:
    return 0
  summary = run_dir.write(sessions)
  print(_report(summary, out))
  return _failed(summary["errors"], out)


def main(argv: list[str]) -> None:
  cli.main(FLAGS, __doc__, argv, run)


if __name__ == "__main__":
  cli.process(lambda: main(sys.argv))
