"""What `infer.py` runs: one answer streamed, an interactive chat, and a manifest in batches.

`Assistant` holds a loaded model, its processor and the decoding settings, and keeps the figures the
CLI reports at the end (time to first token, tokens/s, audio seconds).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from af3_jax import decode
from af3_jax.audio import features
from af3_jax.data.manifest import Sample
from af3_jax.pretrained import Model
from af3_jax.processor import Encoded, Processor


@dataclasses.dataclass
class Stats:
  requests: int = 0
  first_token_s: float = 0.0  # summed over streamed requests
  streamed: int = 0
  new_tokens: int = 0
  audio_s: float = 0.0
  started: float = dataclasses.field(default_factory=time.perf_counter)

  def summary(self) -> str:
    wall = time.perf_counter() - self.started
    ttft = f"{self.first_token_s / self.streamed:.2f} s" if self.streamed else "n/a (not streamed)"
    return (f"{self.requests} request(s) in {wall:.1f} s: time to first token {ttft}, "
            f"{self.new_tokens / wall:.1f} new tokens/s, {self.audio_s:.1f} s of audio")


class Assistant:
  """Answers conversations with a model and processor under fixed decoding settings."""

  def __init__(self, model: Model, processor: Processor, *, max_new_tokens: int, think: bool = False,
               **sampling: Any):
    self.model = model
    self.processor = processor
    self.max_new_tokens = max_new_tokens
    self.think = think
    self.sampling = sampling
    self.stats = Stats()

  def encode(self, conversation: list[dict]) -> Encoded:
    """Processes one conversation, refusing a prompt that would not fit the context with its answer."""
    encoded = self.processor.encode(conversation, think=self.think)
    context = self.model.config.decoder.max_position_embeddings
    if len(encoded.ids) + self.max_new_tokens > context:
      raise ValueError(f"the prompt has {len(encoded.ids)} tokens; with {self.max_new_tokens} new tokens "
                       f"that exceeds the model's context of {context}")
    return encoded

  def _inputs(self, encoded: Sequence[Encoded]) -> dict[str, np.ndarray]:
    batch = self.processor.collate(encoded)
    if "input_features_mask" in batch:
      self.stats.audio_s += batch["input_features_mask"].sum() * features.HOP / features.SAMPLE_RATE
    self.stats.requests += len(encoded)
    return batch

  def _text(self, tokens: Iterable[int]) -> str:
    return self.processor.tokenizer.decode(list(tokens), skip_special_tokens=True)

  def reply(self, conversation: list[dict], out: IO[str] | None = None) -> str:
    """Streams the answer to one conversation to `out` as it is generated; returns the whole text."""
    start = time.perf_counter()
    batch = self._inputs([self.encode(conversation)])
    tokens, shown = [], ""
    for step in decode.generate_stream(self.model, batch, self.max_new_tokens, **self.sampling):
      if not tokens:
        self.stats.first_token_s += time.perf_counter() - start
        self.stats.streamed += 1
      tokens.append(int(step[0]))
      text = self._text(tokens)
      if out is not None and text.startswith(shown):  # holds back a half-decoded multi-byte character
        out.write(text[len(shown):])
        out.flush()
        shown = text
    self.stats.new_tokens += len(tokens)
    return self._text(tokens).strip()

  def reply_batch(self, encoded: Sequence[Encoded]) -> list[str]:
    """Answers encoded conversations together (not streamed)."""
    new = decode.generate(self.model, self._inputs(encoded), self.max_new_tokens, **self.sampling)
    pad = decode.settings(self.model.path, **self.sampling)[2]
    self.stats.new_tokens += int((new != pad).sum())
    return [self._text(row[row != pad]).strip() for row in new]


def prompt_turns(conversation: list[dict]) -> list[dict]:
  """The conversation up to its last user turn: a manifest's reference answers are not prompts."""
  last_user = max(i for i, m in enumerate(conversation) if m["role"] == "user")
  return conversation[: last_user + 1]


def finished_ids(out_path: Path) -> set[str]:
  """Ids already answered in a results file. Items that failed are tried again (their audio may have
  been fixed since), and a line cut short by a crash is ignored, so that item is redone too."""
  done = set()
  if out_path.is_file():
    for line in out_path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and "output" in record:
        done.add(str(record["id"]))
  return done


def run_batch(assistant: Assistant, samples: Sequence[Sample], out_path: Path, batch_size: int) -> int:
  """Answers every sample not yet in `out_path`, appending one JSON line per item; returns the failures.

  An item whose audio or prompt is bad gets `{"id", "error"}` and the run goes on.
  """
  todo = [s for s in samples if s.id not in finished_ids(out_path)]
  failures = 0
  if out_path.is_file() and not out_path.read_bytes().endswith(b"\n") and out_path.stat().st_size:
    with open(out_path, "a") as out:
      out.write("\n")  # a crash cut the last line short; keep it, but start ours on a fresh line
  with open(out_path, "a") as out, tqdm(total=len(todo), desc="items", unit="item") as bar:
    for start in range(0, len(todo), batch_size):
      chunk = todo[start:start + batch_size]
      good, encoded = [], []
      for sample in chunk:
        try:
          encoded.append(assistant.encode(prompt_turns(sample.conversation)))
          good.append(sample)
        except ValueError as e:
          out.write(json.dumps({"id": sample.id, "error": str(e)}) + "\n")
          failures += 1
      if good:
        for sample, answer in zip(good, assistant.reply_batch(encoded), strict=True):
          out.write(json.dumps({"id": sample.id, "output": answer}) + "\n")
      out.flush()
      bar.update(len(chunk))
  return failures


def run_chat(assistant: Assistant, lines: Iterable[str], out: IO[str], err: IO[str]) -> None:
  """A multi-turn chat over `lines` (a terminal or piped stdin): `/audio PATH` attaches audio to the
  next turn, `/reset` starts a new conversation, `/exit` ends; any other line is the user's turn.
  A turn that fails (a bad audio file, say) is reported on `err` and dropped; the chat goes on."""
  conversation, pending = [], []
  for line in lines:
    line = line.strip()
    if not line:
      continue
    if line == "/exit":
      break
    if line == "/reset":
      conversation, pending = [], []
      err.write("(new conversation)\n")
    elif line.startswith("/audio"):
      pending.append({"type": "audio", "path": line.removeprefix("/audio").strip()})
    else:
      turn = {"role": "user", "content": [*pending, {"type": "text", "text": line}]}
      pending = []
      try:
        answer = assistant.reply([*conversation, turn], out)
      except ValueError as e:
        err.write(f"error: {e}\n")
        continue
      out.write("\n")
      conversation += [turn, {"role": "assistant", "content": answer}]
