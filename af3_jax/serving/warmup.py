"""The server's warm-up: the programs it compiles before it answers, and the rest in the background.

Before /health says 200 (`Plan.now`): what the common requests take, a short question, one clip of up
to 30 s with its question, and the decode windows of such a request with an answer of up to
`ANSWER_TOKENS`. Then, in a background thread (`Background`), every other shape a request is likely to
take, likeliest first: shorter clips, several requests prefilled at once, longer decode windows, long
prompts, long audio (`Plan.later`). Both compile without running anything (`DecodeBatch.compile_prefill`,
`DecodeBatch.compile_decode`), so requests are served meanwhile; one whose shape is not compiled yet compiles
it first, and is only slower. The shapes come from the engine's own buckets, whatever they are. With the
persistent compilation cache (`cli.use_compilation_cache`), a later start finds every program there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable

from af3_jax.audio import features
from af3_jax.buckets import bucket, window_bucket
from af3_jax.inference import requests
from af3_jax.inference.engine import Engine, Shape
from af3_jax.models import whisper

QUESTION_TOKENS = 64  # a chat turn's template and a short question
ANSWER_TOKENS = 256  # the answers the first decode windows cover


@dataclasses.dataclass(frozen=True)
class Program:
  """One program to compile: what it is, and the call that compiles it."""

  name: str
  compile: Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Plan:
  now: list[Program]
  later: list[Program]


def plan(engine: Engine, max_windows: int = features.MAX_WINDOWS) -> Plan:
  """The programs to compile before serving, and after, in order (see the module docstring); `max_windows`:
  the most audio windows a request has (the processor's)."""
  limit = engine.max_len
  clip = whisper.tokens_per_window(engine.model.config.encoder) + QUESTION_TOKENS  # 30 s and a question
  prompts = sorted({requests.prompt_bucket(n, limit) for n in range(1, limit + 1)})
  short = [t for t in prompts if t <= requests.prompt_bucket(clip, limit)]
  rows = [r for r in sorted({bucket(n) for n in range(2, engine.max_slots + 1)})
          if r * requests.prompt_bucket(clip, limit) <= engine.prefill_tokens]
  windows = engine.batch.decode_windows()
  first = [w for w in windows if w <= engine.batch.length_bucket(clip + ANSWER_TOKENS)]
  seen: set[Shape] = set()
  now = _new([Shape.of(1, QUESTION_TOKENS, 0, limit), Shape.of(1, clip, 1, limit)], seen)
  later = _new([Shape(1, t, 1) for t in reversed(short)] + [Shape(1, t, 0) for t in short]
               + [Shape.of(r, n, w, limit) for r in rows for n, w in ((clip, r), (QUESTION_TOKENS, 0))], seen)
  longest = _new([Shape(1, t, w) for t in prompts if t not in short for w in (0, 1)] + _long_audio(engine, prompts, max_windows),
                 seen)
  return Plan(_prefills(engine, now) + _decodes(engine, first),
              _prefills(engine, later) + _decodes(engine, [w for w in windows if w not in first])
              + _prefills(engine, longest))


def _new(shapes: list[Shape], seen: set[Shape]) -> list[Shape]:
  """`shapes` not in `seen`, in order, once each; they join `seen`."""
  new = [s for s in dict.fromkeys(shapes) if s not in seen]
  seen.update(new)
  return new


def _prefills(engine: Engine, shapes: list[Shape]) -> list[Program]:
  return [Program(f"prefill {s.describe()}", functools.partial(engine.batch.compile_prefill, s)) for s in shapes]


def _decodes(engine: Engine, windows: list[int]) -> list[Program]:
  return [Program(f"decode window {w} tokens", functools.partial(engine.batch.compile_decode, w)) for w in windows]


def _long_audio(engine: Engine, prompts: list[int], max_windows: int) -> list[Shape]:
  """Single clips of 2 windows or more: for each window bucket, the prompt buckets a clip of that many
  windows (about 750 tokens a window) falls in."""
  per_window = whisper.tokens_per_window(engine.model.config.encoder)
  ladder = sorted({window_bucket(n) for n in range(1, max_windows + 1)})  # 1 to 8, 10, ..., 20 (40)
  shapes = []
  for fewer, w in zip(ladder, ladder[1:]):  # more than `fewer` windows: at least `fewer` full ones
    if fewer * per_window >= engine.max_len:
      break
    low = requests.prompt_bucket(fewer * per_window + 1, engine.max_len)
    high = requests.prompt_bucket(w * per_window + QUESTION_TOKENS, engine.max_len)
    shapes += [Shape(1, t, w) for t in prompts if low <= t <= high]
  return shapes


def start(engine: Engine, log: logging.Logger, max_windows: int = features.MAX_WINDOWS) -> Background:
  """Grows the engine's cache to its full length, compiles `plan(engine).now` in this thread, then starts
  compiling the rest in the background; a log line for each phase, with counts, and for each program now."""
  started = time.perf_counter()
  engine.batch.reserve(engine.max_len)  # the programs compiled ahead are for the cache's length
  programs = plan(engine, max_windows)
  log.info("warm-up: compiling %d programs for common requests (a question, a clip of up to 30 s, answers up to "
           "%d tokens)", len(programs.now), ANSWER_TOKENS)
  for i, program in enumerate(programs.now, 1):
    begun = time.perf_counter()
    program.compile()
    log.info("warm-up %d/%d: %s (%.1f s)", i, len(programs.now), program.name, time.perf_counter() - begun)
  context = engine.model.config.decoder.max_position_embeddings
  hint = (f"; --max-model-len shortens it (the context now is the model's, {context} tokens)"
          if engine.max_len == context else "")
  log.info("warm-up done in %.1f s; %d more programs compile in the background (longer prompts and audio, several "
           "requests prefilled at once, decode windows up to %d tokens), and a request of a shape not compiled yet "
           "compiles it first%s", time.perf_counter() - started, len(programs.later), engine.max_len, hint)
  return Background(programs.later, log).start()


class Background:
  """Compiles programs one after another in a thread of its own, logging its progress about every tenth
  of them; `stop` ends it after the program it is compiling."""

  def __init__(self, programs: list[Program], log: logging.Logger):
    self.programs, self.log = programs, log
    self._stopping = threading.Event()
    self._thread = threading.Thread(target=self._run, name="af3-warm-up", daemon=True)

  def start(self) -> Background:
    self._thread.start()
    return self

  def join(self, timeout: float | None = None) -> bool:
    """Waits until every program is compiled (or `stop`); whether it is done."""
    self._thread.join(timeout)
    return not self._thread.is_alive()

  def stop(self) -> None:
    self._stopping.set()
    self.join()

  def _run(self) -> None:
    started, total = time.perf_counter(), len(self.programs)
    for i, program in enumerate(self.programs, 1):
      if self._stopping.is_set():
        return
      try:
        program.compile()
      except Exception as e:  # noqa: BLE001: that shape compiles at its first request instead
        self.log.warning("background warm-up: %s failed (%s); it compiles when a request needs it", program.name, e)
      if i == total or i * 10 // total != (i - 1) * 10 // total:
        self.log.info("background warm-up: %d/%d programs compiled (%.0f s)", i, total, time.perf_counter() - started)
