"""The upstream JSON manifest (NVIDIA `llava/data` format) read into processor conversations.

A manifest is a list of `{"id", "sound": path | [paths] (absent for text only), "conversations":
[{"from": "human" | "gpt", "value": str}, ...]}` (docs/upstream.md#training-data). As in NVIDIA's
dataset, a single `sound` path (and text only) keeps the first exchange only and drops `<sound>`-like
literals from the question, while a `sound` list keeps every turn and places audio with `<sound-k>`
tags. Relative sound paths are taken from the manifest's folder (or a root given to `read_manifest`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROLES = {"human": "user", "gpt": "assistant"}
# Literals NVIDIA removes from a single-audio question before it prepends the audio windows.
_LITERALS = ("<speech>", "<sound>", "<en><asr>", "<eng><asr>")
# Places the k-th audio of a conversation (1-based), in manifests and in processor messages alike.
SOUND_TAG = re.compile(r"<sound-(\d+)>")


@dataclasses.dataclass(frozen=True)
class Sample:
  id: str
  conversation: list[dict[str, Any]]  # HF-style messages, as `Processor.apply_chat_template` takes


def read_manifest(path: str | Path, root: str | Path | None = None) -> list[Sample]:
  """Every item of a manifest, relative sound paths taken from `root` (default: the manifest's folder);
  a malformed item raises ValueError naming the file and the item."""
  path = Path(path)
  root = path.parent if root is None else Path(root)
  try:
    items = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON manifest ({e})") from None
  if not isinstance(items, list):
    raise ValueError(f"{path}: a manifest is a JSON list of items, got {type(items).__name__}")
  samples = []
  for index, item in enumerate(items):
    try:
      samples.append(_sample(item, root))
    except ValueError as e:
      name = f" (id {item['id']!r})" if isinstance(item, dict) and "id" in item else ""
      raise ValueError(f"{path}: item {index}{name}: {e}") from None
  return samples


def _sample(item: Any, root: Path) -> Sample:
  if not isinstance(item, dict):
    raise ValueError("must be an object")
  if "id" not in item:
    raise ValueError("has no id")
  turns = item.get("conversations")
  if not isinstance(turns, list) or len(turns) < 1:
    raise ValueError("needs a non-empty 'conversations' list")
  for t in turns:
    if not isinstance(t, dict) or t.get("from") not in _ROLES or not isinstance(t.get("value"), str):
      raise ValueError(f"each turn is {{'from': 'human'|'gpt', 'value': str}}, got {t!r:.80}")
  sound = item.get("sound")
  sounds = sound if isinstance(sound, list) else [] if sound is None else [sound]
  if not all(isinstance(s, str) for s in sounds):
    raise ValueError("'sound' must be a path or a list of paths")
  audio = [{"type": "audio", "path": str(root / s)} for s in sounds]  # absolute paths stay as they are
  if isinstance(sound, list):
    for t in turns:
      for k in SOUND_TAG.findall(t["value"]):
        if not 1 <= int(k) <= len(sounds):
          raise ValueError(f"<sound-{k}> but 'sound' lists {len(sounds)} file(s)")
    messages = [{"role": _ROLES[t["from"]], "content": [{"type": "text", "text": t["value"]}]} for t in turns]
  else:
    question = _strip_literals(turns[0]["value"]) if sounds else turns[0]["value"]
    messages = [{"role": _ROLES[t["from"]], "content": [{"type": "text", "text": v}]}
                for t, v in zip(turns[:2], [question] + [t["value"] for t in turns[1:2]])]
  messages[0]["content"] = audio + messages[0]["content"]
  return Sample(str(item["id"]), messages)


def _strip_literals(question: str) -> str:
  """NVIDIA's order of removal (`LazySupervisedDataset.__getitem__`): "X\\n", then "\\nX", then "X"."""
  for literal in _LITERALS:
    for form in (literal + "\n", "\n" + literal, literal):
      question = question.replace(form, "")
  return question


def batch_items(samples: Sequence[Sample], manifest: str | Path) -> list[Sample]:
  """A manifest's samples as prompts: each conversation up to its last user turn (the reference answers
  that follow are not prompts). Refuses in one ValueError, naming them all, ids that repeat once made
  strings (`read_manifest` makes 1 and "1" one id and null "None"; results are keyed by id) and items
  with no user turn to answer. Sample i is the manifest's item i."""
  where: dict[str, list[int]] = {}
  for index, sample in enumerate(samples):
    where.setdefault(sample.id, []).append(index)
  repeated = [f"{id_!r} (items {', '.join(map(str, at))})" for id_, at in where.items() if len(at) > 1]
  if repeated:
    raise ValueError(f"{manifest}: ids must be unique as strings (1 and \"1\" are one id, null is 'None'); "
                     f"repeated: {'; '.join(repeated)}")
  last_user = [max((i for i, m in enumerate(s.conversation) if m["role"] == "user"), default=None)
               for s in samples]
  unasked = [f"{i} ({s.id!r})" for i, (s, last) in enumerate(zip(samples, last_user)) if last is None]
  if unasked:
    raise ValueError(f"{manifest}: item(s) with no human turn to answer: {', '.join(unasked)}")
  return [Sample(s.id, s.conversation[:last + 1]) for s, last in zip(samples, last_user)]
