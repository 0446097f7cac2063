"""What `infer.py` runs: one answer streamed, an interactive chat, and a manifest on the engine.

`Assistant` holds a loaded model, its processor and the decoding settings, and keeps the figures the
CLI reports at the end (time to first token, tokens/s, audio seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import jax.numpy as jnp
import numpy as np
from tokenizers.decoders import DecodeStream
from tqdm import tqdm

from af3_jax import decode, files, weights
from af3_jax.audio import features
from af3_jax.audio.loading import load_audio
from af3_jax.data.manifest import Sample
from af3_jax.engine import Completion, Engine, Request
from af3_jax.pretrained import Model, from_pretrained
from af3_jax.processor import Encoded, Processor


@dataclasses.dataclass
class Stats:
  """What was answered: requests, new tokens, seconds of audio heard (each clip once, however many turns
  of a chat send it again) and the time spent answering (a chat's typing pauses are not counted)."""

  requests: int = 0
  first_token_s: float = 0.0  # summed over streamed requests
  streamed: int = 0
  new_tokens: int = 0
  audio_s: float = 0.0
  busy_s: float = 0.0

  @contextlib.contextmanager
  def answering(self) -> Iterator[None]:
    """Counts the time inside the block as time spent answering."""
    started = time.perf_counter()
    try:
      yield
    finally:
      self.busy_s += time.perf_counter() - started

  def summary(self) -> str:
    ttft = f"{self.first_token_s / self.streamed:.2f} s" if self.streamed else "n/a (not streamed)"
    rate = self.new_tokens / self.busy_s if self.busy_s else 0.0
    return (f"{self.requests} request(s) in {self.busy_s:.1f} s: time to first token {ttft}, "
            f"{rate:.1f} new tokens/s, {self.audio_s:.1f} s of audio")


def load(root: Path, *, dtype: str, think: bool, style: str, quantize: str = "none",
         mesh=None) -> tuple[Model, Processor]:
  """A resolved checkpoint folder's model (its think adapter merged with `think`, quantised as
  `quantize` says) and processor, as the command-line programs load them. The processor loads first: a broken tokenizer fails in a second, not
  after the weights."""
  adapter = weights.think_adapter(root) if think else None
  processor = Processor.from_pretrained(root, style=style)
  return from_pretrained(root, dtype=jnp.dtype(dtype), adapter=adapter, quantize=quantize, mesh=mesh), processor


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

  def _inputs(self, encoded: Sequence[Encoded], count_audio: bool = True) -> dict[str, np.ndarray]:
    batch = self.processor.collate(encoded)
    if count_audio and "input_features_mask" in batch:
      self.stats.audio_s += batch["input_features_mask"].sum() * features.HOP / features.SAMPLE_RATE
    self.stats.requests += len(encoded)
    return batch

  def _text(self, tokens: Iterable[int]) -> str:
    return self.processor.tokenizer.decode(list(tokens), skip_special_tokens=True)

  def reply(self, conversation: list[dict], out: IO[str] | None = None, *, new_audio_s: float | None = None) -> str:
    """Streams the answer to one conversation to `out` as it is generated; returns the whole text.
    new_audio_s: the seconds of audio the conversation adds to what was heard before (a chat's new
    clips; None: all of its audio is new)."""
    with self.stats.answering():
      text = self._reply(conversation, out, count_audio=new_audio_s is None)
    self.stats.audio_s += new_audio_s or 0.0
    return text

  def _reply(self, conversation: list[dict], out: IO[str] | None, count_audio: bool) -> str:
    start = time.perf_counter()
    batch = self._inputs([self.encode(conversation)], count_audio)
    # Decodes each new token against a few before it, not the whole answer again (linear, not quadratic
    # in its length); `step` gives None while a multi-byte character is still incomplete.
    stream, backend = DecodeStream(skip_special_tokens=True), self.processor.tokenizer.backend_tokenizer
    tokens, shown = [], []
    for step in decode.generate_stream(self.model, batch, self.max_new_tokens, **self.sampling):
      if not tokens:
        self.stats.first_token_s += time.perf_counter() - start
        self.stats.streamed += 1
      tokens.append(int(step[0]))
      if out is not None and (piece := stream.step(backend, tokens[-1])):
        shown.append(piece)
        out.write(piece)
        out.flush()
    self.stats.new_tokens += len(tokens)
    # One full decode at the end (linear) gives exactly what `decode` gives, also where the answer ends in
    # a cut-off character that the stream held back: `out` gets that rest too (as a replacement char).
    text = self._text(tokens)
    if out is not None and text.startswith(held := "".join(shown)) and text != held:
      out.write(text[len(held):])
      out.flush()
    return text.strip()

  def answers(self, conversations: Iterable[list[dict]], slots: int) -> Iterator[str | ValueError]:
    """Answers conversations on a continuous-batching engine of `slots` slots, yielding each answer in
    order, or the ValueError of one that cannot be answered (a bad audio file, too long a prompt). The
    engine decodes in its own thread while this one prepares the next conversations."""
    with Engine(self.model, max_slots=slots) as engine:
      for _, outcome in engine.map(conversations, self._request):
        if isinstance(outcome, Completion) and outcome.error is not None:
          outcome = ValueError(f"generation failed: {outcome.error}")
        if isinstance(outcome, ValueError):
          yield outcome
          continue
        self.stats.new_tokens += outcome.completion_tokens
        yield self._text(outcome.tokens).strip()

  def _request(self, conversation: list[dict]) -> Request:
    return Request(self._inputs([self.encode(conversation)]), self.max_new_tokens, **self.sampling)


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


_RECORD_START = '{"id": '  # how every line run_batch writes begins (json.dumps of {"id", ...})


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


def run_batch(assistant: Assistant, items: Sequence[Sample], out_path: Path, batch_size: int) -> int:
  """Answers the prompts in `items` (see `batch_items`) not yet answered in `out_path`, `batch_size` at
  a time on the engine, appending a {"id", "output"} line per item, or {"id", "error"} for an item whose
  audio or prompt is bad (the others are still answered); returns the failures.

  However the run ends (Ctrl-C included), `out_path` is then compacted (`compact_results`): one valid
  JSONL line per id, the manifest's ids in manifest order, so a failed item retried on every rerun still
  has one line, in its place."""
  order = [s.id for s in items]
  done = compact_results(out_path, order)  # also drops a line half-written by a crash before we append
  todo = [s for s in items if s.id not in done]
  failures = 0
  try:
    with (open(out_path, "a") as out, tqdm(total=len(todo), desc="items", unit="item") as bar,
          contextlib.closing(assistant.answers((s.conversation for s in todo), batch_size)) as answers,
          assistant.stats.answering()):
      for sample, answer in zip(todo, answers, strict=True):
        failures += isinstance(answer, ValueError)
        key = "error" if isinstance(answer, ValueError) else "output"
        out.write(json.dumps({"id": sample.id, key: str(answer)}) + "\n")
        out.flush()
        bar.update()
  finally:
    compact_results(out_path, order)
  return failures


_COMMANDS = {"/audio": "/audio PATH", "/reset": "/reset", "/exit": "/exit"}


def _command_error(command: str, argument: str) -> str | None:
  """What is wrong with a `/command argument` chat line, or None when it is a valid command."""
  if command not in _COMMANDS:
    return f"unknown command {command}; the commands are {', '.join(_COMMANDS.values())}"
  if bool(argument) != (command == "/audio"):
    return f"usage: {_COMMANDS[command]}"
  return None


CHAT_HELP = ("type a message and press Enter; /audio PATH attaches a file to your next message, /reset starts "
             "a new conversation, /exit (or Ctrl-D) ends")


def run_chat(assistant: Assistant, lines: Iterable[str], out: IO[str], err: IO[str], prompt: str = "") -> None:
  """A multi-turn chat over `lines` (a terminal or piped stdin): `/audio PATH` attaches audio to the
  next turn (the file is checked at once, and said to be attached), `/reset` starts a new conversation,
  `/exit` ends; any other line is the user's turn. A bad command, or a turn that fails (too long a
  prompt, say), is one `error:` line on `err` and is dropped; the chat goes on. `prompt` is written to
  `err` before each line is read (for a terminal)."""
  conversation, pending, pending_s = [], [], 0.0
  for line in _prompted(lines, err, prompt):
    line = line.strip()
    if not line:
      continue
    if line.startswith("/"):
      command, *rest = line.split(maxsplit=1)
      argument = rest[0] if rest else ""
      if problem := _command_error(command, argument):
        err.write(f"error: {problem}\n")
      elif command == "/exit":
        break
      elif command == "/reset":
        conversation, pending, pending_s = [], [], 0.0
        err.write("(new conversation)\n")
      else:
        try:
          seconds = len(load_audio(argument, style=assistant.processor.style)) / features.SAMPLE_RATE
        except ValueError as e:
          err.write(f"error: {e}; not attached\n")
          continue
        pending.append({"type": "audio", "path": argument})
        pending_s += seconds
        err.write(f"(attached {argument}, {seconds:.1f} s, to your next message)\n")
      continue
    turn, new_audio_s = {"role": "user", "content": [*pending, {"type": "text", "text": line}]}, pending_s
    pending, pending_s = [], 0.0  # a turn that fails takes its attachments with it
    try:
      answer = assistant.reply([*conversation, turn], out, new_audio_s=new_audio_s)
    except ValueError as e:
      err.write(f"error: {e}\n")
      continue
    out.write("\n")
    out.flush()
    conversation += [turn, {"role": "assistant", "content": answer}]


def _prompted(lines: Iterable[str], err: IO[str], prompt: str) -> Iterator[str]:
  """`lines`, with `prompt` written to `err` before each is read."""
  lines = iter(lines)
  while True:
    if prompt:
      err.write(prompt)
      err.flush()
    try:
      yield next(lines)
    except StopIteration:
      return
