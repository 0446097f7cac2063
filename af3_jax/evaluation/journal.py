"""Answers as they come, one JSON-lines file per process, and all processes' answers merged.

Process p of n owns items p, p + n, p + 2n, ... of the benchmark and appends a line per answered
item to OUT/answers.{p}.jsonl: {"id", "output"} or {"id", "error"}, the results format of
`infer.py --batch` (`assistant.compact_results` keeps it valid after a crash). Progress is by item id,
never by audio path: several questions share one clip. Any process reads every journal in OUT, so a
rerun with another number of processes still skips what any earlier run answered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from af3_jax.results import compact_results, parse_results

T = TypeVar("T")


def path(out: Path, process: int) -> Path:
  return out / f"answers.{process}.jsonl"


def shard(items: Sequence[T], process: int, count: int) -> list[T]:
  """The items process `process` of `count` answers: every count-th from its index on."""
  return list(items[process::count])


def read(out: Path) -> dict[str, dict]:
  """Every record in OUT's journals by id, whichever process or run wrote it: an output beats an error
  (an item retried after its audio was fixed), a later error an earlier one. Other processes may be
  appending: a half-written last line is left out, not an error."""
  merged: dict[str, dict] = {}
  for journal in sorted(out.glob("answers.*.jsonl")):
    for id_, answered, line in parse_results(journal, journal.read_text()):
      if answered or "output" not in merged.get(id_, {}):
        merged[id_] = json.loads(line)
  return merged


def open_for(out: Path, process: int) -> Path:
  """This process's journal, mended for appending (a crash's half-written last line dropped)."""
  own = path(out, process)
  compact_results(own)
  return own
