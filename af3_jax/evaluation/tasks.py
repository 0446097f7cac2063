"""Benchmark files read into prompts, and each task's answer key and scorer.

Every task turns its file's items into (id, conversation) prompts and writes them back, each with the
model's answer under the key the benchmark's official scorer reads, into predictions.json:

  mmau      MMAU test / test-mini JSON (Sakshi113/MMAU): answer under "model_output", so MMAU's own
            evaluation.py reads the file unchanged (its README says "model_prediction"; its code reads
            "model_output").
  mmar      MMAR-meta.jsonl (ddlBoJack/MMAR): answer under "answer_prediction", read by its evaluation.py.
  asr       {"audio", "text"} items (LibriSpeech-style): WER.
  aqa       {"audio", "question", "answer"} items (Clotho-AQA-style): accuracy after normalisation.
  manifest  an upstream LLaVA-style manifest: the answer beside the reference turn, exact match.

Files are a JSON list, or JSON lines when the name ends in .jsonl. Audio paths are taken from
`audio_root` (default: the data file's folder). Items without an "id" (asr, aqa) are numbered from 0.
"""

from __future__ import annotations

import dataclasses
import json
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from af3_jax.data.manifest import Sample, batch_items, read_manifest
from af3_jax.data.processor import ASR_PROMPT
from af3_jax.evaluation import scoring

# NVIDIA's multiple-choice prompt: Sreyan88's answer in NVIDIA/audio-flamingo issue #29 (MMAU) and every
# prompt of static/mmar.json on the audio_flamingo_3 branch (MMAR).
CHOICE_TEMPLATE = "{question} Choose the correct option from the following options:\n{options}"
ERROR_KEY = "error"  # predictions.json: why an item has no answer (the official scorers skip such items)
REFERENCE_KEY = "reference"  # manifest predictions: the reference turn beside the answer


@dataclasses.dataclass(frozen=True)
class Task:
  """How one benchmark is read, prompted and scored."""

  name: str
  fields: tuple[str, ...]  # required in every item
  audio_field: str | None  # the item's audio path (None: the manifest's own `sound`)
  answer_key: str
  template: str | None  # the default prompt (None: the manifest's conversation)
  template_fields: frozenset[str]
  score: Callable[[Sequence[dict]], dict]  # predictions.json's items -> the summary's scores


def _answered(records: Sequence[dict], reference_key: str, answer_key: str) -> list[tuple[str, str]]:
  return [(r[reference_key] or "", r[answer_key] or "") for r in records if answer_key in r]


_CHOICE_FIELDS = frozenset({"question", "options", "choices"})
TASKS = {t.name: t for t in [
    Task("mmau", ("id", "audio_id", "question", "choices", "answer"), "audio_id", "model_output", CHOICE_TEMPLATE,
         _CHOICE_FIELDS,
         lambda rs: scoring.choice_summary(rs, "model_output", ("task", "category", "sub-category", "difficulty"))),
    Task("mmar", ("id", "audio_path", "question", "choices", "answer"), "audio_path", "answer_prediction",
         CHOICE_TEMPLATE, _CHOICE_FIELDS,
         lambda rs: scoring.choice_summary(rs, "answer_prediction", ("modality", "category", "sub-category"))),
    Task("asr", ("audio", "text"), "audio", "model_output", ASR_PROMPT, frozenset(),
         lambda rs: scoring.wer_summary(_answered(rs, "text", "model_output"))),
    Task("aqa", ("audio", "question", "answer"), "audio", "model_output", "{question}", frozenset({"question"}),
         lambda rs: scoring.match_summary(_answered(rs, "answer", "model_output"), normalized=True)),
    Task("manifest", (), None, "model_output", None, frozenset(), lambda rs: _manifest_summary(rs)),
]}


def _manifest_summary(records: Sequence[dict]) -> dict:
  """Exact match over the answered items that have a reference turn; `no_reference` counts the others."""
  answered = [r for r in records if "model_output" in r]
  scores = scoring.match_summary(_answered([r for r in answered if REFERENCE_KEY in r], REFERENCE_KEY, "model_output"),
                                 normalized=False)
  return {**scores, "no_reference": sum(REFERENCE_KEY not in r for r in answered)}


@dataclasses.dataclass(frozen=True)
class Item:
  """One benchmark item: its record as read, the prompt to answer, its audio files."""

  record: dict
  prompt: Sample
  audio: tuple[str, ...]
  reference: str | None = None  # manifest: the turn after the prompt

  @property
  def id(self) -> str:
    return self.prompt.id


@dataclasses.dataclass(frozen=True)
class Benchmark:
  task: Task
  items: list[Item]

  def predictions(self, answers: dict[str, dict]) -> list[dict]:
    """predictions.json's items: each record with its answer (or its error) from `answers`, which maps
    an id to a {"output"} or {"error"} record; items with neither are written as read."""
    out = []
    for item in self.items:
      record = dict(item.record)
      if item.reference is not None:
        record[REFERENCE_KEY] = item.reference
      got = answers.get(item.id, {})
      if "output" in got:
        record[self.task.answer_key] = got["output"]
      elif "error" in got:
        record[ERROR_KEY] = got["error"]
      out.append(record)
    return out


def read_records(path: Path) -> list[dict]:
  """A JSON list of objects, or JSON lines (.jsonl); ValueError naming the file and the bad line."""
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot read ({e})") from None
  if path.suffix == ".jsonl":
    records = []
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {number}: not valid JSON ({e})") from None
  else:
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
      raise ValueError(f"{path}: expected a JSON list of items, got {type(records).__name__}")
  for index, record in enumerate(records):
    if not isinstance(record, dict):
      raise ValueError(f"{path}: item {index} is not an object")
  return records


def guess_task(records: Sequence[dict]) -> str:
  """The task a foreign predictions.json was made for, from the keys its items hold."""
  keys = set().union(*records)
  for key, task in (("answer_prediction", "mmar"), ("choices", "mmau"), ("conversations", "manifest"),
                    ("text", "asr")):
    if key in keys:
      return task
  return "aqa"


def check_template(task: Task, template: str) -> None:
  """Refuses a template naming a field this task does not fill (or a broken one), in one line."""
  try:
    named = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
  except ValueError as e:
    raise ValueError(f"--prompt-template: {e} (write a literal brace as {{{{ or }}}})") from None
  unknown = named - task.template_fields
  if unknown:
    allowed = ", ".join(f"{{{f}}}" for f in sorted(task.template_fields)) or "none"
    raise ValueError(f"--prompt-template: unknown field(s) {', '.join(sorted(unknown))} for task {task.name} "
                     f"(fields: {allowed})")


def _prompt(task: Task, template: str, record: dict) -> str:
  values = {"question": record.get("question", "")}
  if task.template_fields == _CHOICE_FIELDS:
    choices = [str(c) for c in record["choices"]]
    values["options"] = "\n".join(f"({string.ascii_uppercase[i]}) {c}" for i, c in enumerate(choices))
    values["choices"] = "\n".join(choices)
  return template.format(**values)


def _check_record(task: Task, record: dict) -> None:
  missing = [f for f in task.fields if f not in record]
  if missing:
    raise ValueError(f"missing field(s) {', '.join(missing)}")
  if "choices" in task.fields:
    choices = record["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(string.ascii_uppercase):
      raise ValueError("'choices' must be a list of 2 to 26 options")
  if task.audio_field and not isinstance(record[task.audio_field], str):
    raise ValueError(f"'{task.audio_field}' must be a path")


def check_records(task: Task, records: Sequence[dict], path: Path) -> None:
  """Raises ValueError naming the file and the first item that lacks what `task` reads."""
  for index, record in enumerate(records):
    try:
      _check_record(task, record)
    except ValueError as e:
      name = f" (id {record['id']!r})" if "id" in record else ""
      raise ValueError(f"{path}: item {index}{name}: {e}") from None


def _manifest_items(path: Path, records: list[dict], root: Path) -> list[Item]:
  samples = read_manifest(path, root=root)[:len(records)]
  prompts = batch_items(samples, path)
  items = []
  for record, sample, prompt in zip(records, samples, prompts, strict=True):
    after = sample.conversation[len(prompt.conversation):]
    reference = after[0]["content"][0]["text"] if after and after[0]["role"] == "assistant" else None
    audio = tuple(c["path"] for m in prompt.conversation for c in m["content"] if c["type"] == "audio")
    items.append(Item(record, prompt, audio, reference))
  return items


def load(task_name: str, data: str | Path, audio_root: str | Path | None = None, template: str | None = None,
         limit: int | None = None) -> Benchmark:
  """The benchmark in `data` for `task_name`: its first `limit` items (None: all) as prompts.
  Raises ValueError, naming the file and item, for anything malformed."""
  task = TASKS[task_name]
  path = Path(data)
  if not path.is_file():
    raise ValueError(f"{path}: no such data file")
  root = Path(audio_root) if audio_root is not None else path.parent
  if not root.is_dir():
    raise ValueError(f"{root}: --audio-root is not a folder")
  if task.template is None and template is not None:
    raise ValueError(f"--prompt-template does not apply to task {task.name}: its prompts are the manifest's turns")
  template = task.template if template is None else template
  if template is not None:
    check_template(task, template)
  records = read_records(path)[:limit]
  if task.template is None:
    return Benchmark(task, _manifest_items(path, records, root))
  check_records(task, records, path)
  samples, audio = [], []
  for index, record in enumerate(records):
    audio.append(str(root / record[task.audio_field]))
    content = [{"type": "audio", "path": audio[-1]}, {"type": "text", "text": _prompt(task, template, record)}]
    samples.append(Sample(str(record.get("id", index)), [{"role": "user", "content": content}]))
  prompts = batch_items(samples, path)
  return Benchmark(task, [Item(r, p, (a,)) for r, p, a in zip(records, prompts, audio)])
