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
