"""The results file `infer.py --batch` and `eval.py` write: JSON lines of {"id", "output"} or
{"id", "error"}, appended as answers come and compacted to one line per id."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from af3_jax import files

_RECORD_START = '{"id": '  # how every line of a results file begins (json.dumps of {"id", ...})


def parse_results(path: Path, text: str) -> list[tuple[str, bool, str]]:
  """(id, answered, line) for each record of a results file's `text`, in file order.

  A last line that a crash cut short (no newline, not JSON, begun as run_batch begins its lines) is
  left out. Any other line that is not an {"id", "output"|"error"} object raises ValueError naming the
  file and line: it is not ours to drop, and the file may not be a results file at all."""
  lines = text.split("\n")  # the last piece is "" when the file ends with a newline
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict) and "id" in record and ("output" in record or "error" in record):
      records.append((str(record["id"]), "output" in record, line))
    elif not (number == len(lines) and record is None and _RECORD_START.startswith(line[:len(_RECORD_START)])):
      raise ValueError(f"{path}: line {number} is not a results record ({{\"id\", \"output\"|\"error\"}}); "
                       "move the file or fix that line")
  return records


def compact_results(path: Path, order: Sequence[str] = ()) -> set[str]:
  """Rewrites a JSONL results file to one line per id; returns the answered ids (none if no file).

  Whichever manifest an id came from, it keeps its "output" line (answers are never dropped) or, if
  it has none, its newest "error" line; a half-written last line is dropped. The ids in `order` (a
  manifest's, in its order) are written in that order, where the first of them stood; other lines keep
  their places. The rewrite is atomic (a crash leaves the old file or the new one) and skipped when
  nothing changes."""
  if not path.exists():
    return set()
  try:
    text = path.read_text()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not a results file ({e})") from None
  records = parse_results(path, text)
  answered = {id_ for id_, ok, _ in records if ok}
  newest_error = {id_: n for n, (id_, ok, _) in enumerate(records) if not ok}
  kept = [(id_, line) for n, (id_, ok, line) in enumerate(records)
          if ok or (id_ not in answered and newest_error[id_] == n)]
  rank = {id_: i for i, id_ in enumerate(order)}
  ours = iter([line for _, line in sorted((rank[id_], line) for id_, line in kept if id_ in rank)])
  # Each of our lines' places is taken, in turn, by our lines in manifest order: the block stays put.
  lines = [next(ours) if id_ in rank else line for id_, line in kept]
  new = "".join(line + "\n" for line in lines)
  if new != text:
    files.write_text_atomic(path, new)
  return answered
