"""An evaluation run: its folder, its one call into the inference path, and the files it ends with.

OUT holds run.json (the settings its answers were made with: a rerun with other settings is refused),
each process's journal (`journal`), and, written by process 0 once every process is done,
predictions.json and summary.json, each replaced atomically. A rerun answers only what no journal
holds; a rerun of a finished run writes nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
import soundfile as sf
from tqdm import tqdm

from af3_jax import files
from af3_jax.audio import features
from af3_jax.config import read_json
from af3_jax.data.manifest import Sample
from af3_jax.evaluation import journal, tasks
from af3_jax.inference import assistant

SETTINGS = "run.json"
PREDICTIONS = "predictions.json"
SUMMARY = "summary.json"
FREE_SETTINGS = ("limit", "batch_size")  # they choose and pace the items, not what an answer is
MAX_AUDIO_S = features.MAX_WINDOWS * features.WINDOW_SAMPLES / features.SAMPLE_RATE  # what the model hears
_KEPT_ON_RESCORE = ("throughput", "settings", "versions")  # what a rescore cannot recompute
_DISTRIBUTIONS = ("af3-jax", "jax", "jaxlib", "flax", "transformers", "tokenizers", "numpy", "jiwer",
                  "whisper-normalizer")

AnswerFn = Callable[[Sequence[Sample]], Iterable[dict]]


def answer(bot: assistant.Assistant, prompts: Sequence[Sample], batch_size: int) -> Iterator[dict]:
  """The one place evaluation meets the inference path: yields one {"id", "output"} or {"id", "error"}
  record per prompt as it is answered, in order. It runs on the continuous-batching engine with
  `batch_size` decode slots (what `infer.py --batch` runs): an item whose audio or prompt is bad fails
  alone, the others are still answered."""
  for sample, outcome in zip(prompts, bot.answers((s.conversation for s in prompts), batch_size), strict=True):
    yield {"id": sample.id, "error" if isinstance(outcome, ValueError) else "output": str(outcome)}


@dataclasses.dataclass
class Throughput:
  """One process's answering in one run: items answered, their seconds of audio, wall seconds from the
  first request to the last answer (jit compiles included, model loading not)."""

  items: int = 0
  audio_s: float = 0.0
  wall_s: float = 0.0


def combined(sessions: Sequence[Throughput]) -> dict:
  """The processes' throughput together: they answer side by side, so the wall time is the longest."""
  items, audio_s = sum(s.items for s in sessions), sum(s.audio_s for s in sessions)
  wall_s = max((s.wall_s for s in sessions), default=0.0)
  return {"items": items, "audio_s": audio_s, "wall_s": wall_s, "items_per_s": items / wall_s if wall_s else None,
          "rtfx": audio_s / wall_s if wall_s else None, "processes": len(sessions),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def gather(session: Throughput) -> list[Throughput]:
  """Every process's throughput, on every process; as a collective, it also waits until all have
  answered (and closed their journals)."""
  if jax.process_count() == 1:
    return [session]
  from jax.experimental import multihost_utils

  rows = multihost_utils.process_allgather(np.array([session.items, session.audio_s, session.wall_s], np.float32))
  return [Throughput(int(r[0]), float(r[1]), float(r[2])) for r in np.asarray(rows).reshape(-1, 3)]


def audio_seconds(paths: Iterable[str]) -> float:
  """Seconds of audio the model hears from these files (each up to its 10-minute cap), from their
  headers; an unreadable file counts 0 (its item fails anyway)."""
  total = 0.0
  for p in paths:
    try:
      total += min(sf.info(p).duration, MAX_AUDIO_S)
    except sf.SoundFileError:  # missing or unreadable
      continue
  return total


def versions() -> dict[str, str]:
  """The software that made the answers: Python, the packages that matter, and this code's commit."""
  out = {"python": platform.python_version()}
  for dist in _DISTRIBUTIONS:
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      continue
  here = Path(__file__).parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                           text=True, timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    return out
  if commit.returncode == 0:
    out["af3_jax_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
  return out


def _dump(value) -> str:
  return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def summarize(task: tasks.Task, predictions: Sequence[dict]) -> dict:
  """The scores of predictions.json's items and what became of them: answered, failed (their error
  kept under "error"), or not reached."""
  scores = task.score(predictions)
  errors = [(i, r) for i, r in enumerate(predictions) if tasks.ERROR_KEY in r]
  answered = sum(task.answer_key in r for r in predictions)
  out = {"task": task.name, **scores, "items": len(predictions), "answered": answered, "errors": len(errors),
         "unanswered": len(predictions) - answered - len(errors)}
  if "correct" in scores and predictions:  # the official accuracy skips failed items; this counts them wrong
    out["accuracy_over_all_items"] = scores["correct"] / len(predictions) * 100
  out["error_examples"] = [{"id": str(r.get("id", i)), "error": r[tasks.ERROR_KEY]} for i, r in errors[:10]]
  return out


class Run:
  """An evaluation's folder: answers `benchmark` with fixed `settings` (a JSON object of plain values;
  the keys in FREE_SETTINGS may change between reruns)."""

  def __init__(self, out: Path, benchmark: tasks.Benchmark, settings: dict, process: int = 0):
    if out.exists() and not out.is_dir():
      raise ValueError(f"{out}: --out is a file; it takes a folder")
    self.out, self.benchmark, self.settings = out, benchmark, settings
    fixed = {k: v for k, v in settings.items() if k not in FREE_SETTINGS}
    if (out / SETTINGS).exists():
      before = read_json(out / SETTINGS)
      changed = [f"{k}: {before.get(k)!r} there, {fixed.get(k)!r} here" for k in sorted(before.keys() | fixed.keys())
                 if before.get(k) != fixed.get(k)]
      if changed:
        raise ValueError(f"{out}: holds answers made with other settings ({'; '.join(changed)}); "
                         "use another --out, or the same settings to resume")
    # By every process: any may append to its journal before process 0 gets here.
    out.mkdir(parents=True, exist_ok=True)
    if process == 0 and not (out / SETTINGS).exists():
      files.write_text_atomic(out / SETTINGS, _dump(fixed))

  def _todo(self, items: Sequence[tasks.Item], retry_errors: bool) -> list[tasks.Item]:
    answers = journal.read(self.out)
    return [i for i in items if i.id not in answers or (retry_errors and "output" not in answers[i.id])]

  def finished(self, retry_errors: bool = False) -> bool:
    """True when every item has its record and predictions.json and summary.json already say so."""
    if self._todo(self.benchmark.items, retry_errors):
      return False
    written = self.out / PREDICTIONS
    return ((self.out / SUMMARY).is_file() and written.is_file()
            and written.read_text() == _dump(self.benchmark.predictions(journal.read(self.out))))

  def todo(self, process: int, count: int, retry_errors: bool = False) -> list[tasks.Item]:
    """Process `process` of `count`'s items that no journal answers (nor fails, unless `retry_errors`)."""
    journal.open_for(self.out, process)
    return self._todo(journal.shard(self.benchmark.items, process, count), retry_errors)

  def answer(self, items: Sequence[tasks.Item], answer_fn: AnswerFn, process: int = 0) -> Throughput:
    """Answers `items` through `answer_fn`, appending each record to this process's journal as it comes."""
    seconds = {i.id: audio_seconds(i.audio) for i in items}  # headers, read before the clock starts
    session = Throughput()
    start = time.perf_counter()
    with open(journal.path(self.out, process), "a") as out, tqdm(total=len(items), desc="items", unit="item") as bar:
      for record in answer_fn([i.prompt for i in items]):
        out.write(json.dumps(record) + "\n")
        out.flush()
        if "output" in record:
          session.items += 1
          session.audio_s += seconds[record["id"]]
        bar.update(1)
    session.wall_s = time.perf_counter() - start
    return session

  def write(self, sessions: Sequence[Throughput]) -> dict:
    """predictions.json and summary.json from every journal (process 0, after `gather`); the summary."""
    predictions = self.benchmark.predictions(journal.read(self.out))
    summary = {**summarize(self.benchmark.task, predictions), "throughput": combined(sessions),
               "settings": self.settings, "versions": versions()}
    files.write_text_atomic(self.out / PREDICTIONS, _dump(predictions))
    files.write_text_atomic(self.out / SUMMARY, _dump(summary))
    return summary


def rescore(out: Path, task_name: str | None = None) -> dict:
  """summary.json recomputed from OUT/predictions.json, edited or from elsewhere: the task `task_name`,
  else the run's, else guessed from the items' keys; throughput, settings and versions kept from the
  old summary when there is one."""
  path = out / PREDICTIONS
  if not path.is_file():
    raise ValueError(f"{out}: no {PREDICTIONS} to rescore")
  records = tasks.read_records(path)
  before = read_json(out / SUMMARY) if (out / SUMMARY).exists() else {}
  settings = read_json(out / SETTINGS) if (out / SETTINGS).exists() else {}
  task = tasks.TASKS[task_name or settings.get("task") or before.get("task") or tasks.guess_task(records)]
  tasks.check_records(task, records, path)
  summary = {**summarize(task, records), **{k: before[k] for k in _KEPT_ON_RESCORE if k in before}}
  files.write_text_atomic(out / SUMMARY, _dump(summary))
  return summary
