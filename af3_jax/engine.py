"""Continuous batching: requests come and go while up to `max_slots` of them decode together in one
shared KV cache (`slots.py`), each getting the tokens `decode.generate` would give it alone.

`Engine` follows JetStream's engine API (`engine_api.py`): `prefill` runs one request's audio encoder
and prompt and chooses its first token, `insert` puts it into a free slot, `generate` decodes one token
for every slot. `step` is one turn of the loop over them (JetStream's orchestrator): it frees cancelled
requests' slots, prefills waiting requests into free slots (a free-slot queue), starts a decode step,
and hands out the tokens of the step before, freeing each slot whose request is done (an eos id, or
max_new_tokens) at once. So the device decodes while the host reads tokens and schedules, never waiting
for it; the price is one more decode of a slot whose request ended in the step before, whose token is
dropped (a new request in that slot is inserted after it, in device order). Prompts and audio windows are
padded to buckets (`buckets.prompt_bucket`, `buckets.window_bucket`), slots are fixed, and the cache grows
by buckets (at least `MIN_CACHE`) up to `max_len`. A decode step reads only a window of the cache, the
bucket that covers its longest live request (the engine knows each slot's end on the host), so short
requests in a long cache decode at short requests' cost; `warmup` compiles every window and prompt
bucket ahead, so that a warm engine compiles nothing while it serves.

Driving it: `submit(request)` from any thread returns a `Handle` whose `queue` receives each token id as
it is chosen, then None (ValueError for a request that cannot run, `QueueFull` when `max_queue`
requests already wait); `cancel(handle)` frees its slot; `start()` runs `step` in a background thread
until `stop(drain=True)`. An asyncio server passes `listener=lambda item: loop.call_soon_threadsafe(
q.put_nowait, item)` to get the same items on its own queue. `map(items, to_request)` answers many
items in order (infer.py --batch, evaluation). Stop strings are the caller's: it watches the text and
cancels.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from af3_jax import decode, slots
from af3_jax.buckets import bucket, prompt_bucket, window_bucket
from af3_jax.generation import Sampling
from af3_jax.models import whisper
from af3_jax.models.af3 import audio_embed_mask_from_features
from af3_jax.pretrained import Model, check_inputs
from af3_jax.slots import AUDIO, Prefix, Rows

Item = TypeVar("Item")
# The cache's shortest length, and the decode step's shortest window: each length and window is a
# compile of the decode step, and a 30 s clip with its answer is about 1,000 tokens anyway.
MIN_CACHE = 1024
FREE = -1  # the host's end of a slot that holds no request


class QueueFull(Exception):
  """`submit` found `max_queue` requests already waiting for a slot: try again later (HTTP 429 or 503)."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt and how to decode it. inputs: transformers' names for one unpadded row, input_ids (n,)
  or (1, n) (an attention_mask, if given, drops padding) and with audio input_features (W, M, F),
  input_features_mask (W, F), optionally audio_embed_mask (W, P): what `Processor.collate` gives for
  one conversation. Settings left None come from the model's generation defaults, as in `generate`."""

  inputs: Mapping[str, Any]
  max_new_tokens: int
  seed: int = 0
  do_sample: bool | None = None
  temperature: float | None = None
  top_k: int | None = None
  top_p: float | None = None
  repetition_penalty: float | None = None
  eos_token_id: int | list[int] | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
  """A finished request: its new tokens (the eos that ended it included) and why it ended: "stop" (an
  eos id), "length" (max_new_tokens), "cancelled", or "error" (then `error` says what failed).
  prompt_tokens counts the prompt's audio tokens too."""

  tokens: tuple[int, ...]
  finish_reason: str
  prompt_tokens: int
  error: str | None = None

  @property
  def completion_tokens(self) -> int:
    return len(self.tokens)


@dataclasses.dataclass
class _Job:
  """A request checked and padded for the jitted functions (`Engine._prepare`)."""

  inputs: dict[str, np.ndarray] | None  # dropped once prefilled
  length: int  # prompt tokens
  rows: Rows
  key: jax.Array
  eos: frozenset[int]
  max_new_tokens: int
  cache_len: int  # the cache length it needs


class Handle:
  """A submitted request. Its tokens arrive on `queue` as they are chosen, then None once it is done
  (`finish_reason` and `result()` are set by then); `listener`, if given, gets the same items, called
  from the engine's thread (or from `cancel`'s caller, for a request still waiting), so it must not
  block. Iterating a handle yields its tokens (one consumer)."""

  def __init__(self, job: _Job, listener: Callable[[int | None], None] | None = None):
    self._job = job
    self.queue: queue.Queue[int | None] = queue.Queue()
    self.slot: int | None = None  # while it decodes
    self.cancelled = False
    self._listener = listener
    self._tokens: list[int] = []
    self._result: Completion | None = None
    self._done = threading.Event()

  def __iter__(self) -> Iterator[int]:
    while (token := self.queue.get()) is not None:
      yield token

  @property
  def prompt_tokens(self) -> int:
    """The prompt's tokens, its audio tokens included."""
    return self._job.length

  @property
  def done(self) -> bool:
    return self._done.is_set()

  @property
  def finish_reason(self) -> str | None:
    return self._result and self._result.finish_reason

  def result(self, timeout: float | None = None) -> Completion:
    """Waits until the request is done (TimeoutError after `timeout` seconds)."""
    if not self._done.wait(timeout):
      raise TimeoutError("the request is still running")
    return self._result

  def _put(self, item: int | None) -> None:
    self.queue.put(item)
    if self._listener is not None:
      try:
        self._listener(item)
      except Exception:  # a broken listener ends its own request, never the engine
        self._listener, self.cancelled = None, True

  def _push(self, token: int) -> None:
    self._tokens.append(token)
    self._put(token)

  def _finish(self, reason: str, error: BaseException | None = None) -> None:
    self._result = Completion(tuple(self._tokens), reason, self._job.length, None if error is None else repr(error))
    self._done.set()
    self._put(None)


class Engine:
  """Continuous batching over `max_slots` slots (see the module docstring).

  max_len: the most a request may hold, prompt plus new tokens (default: the model's context); the
  cache grows to it by buckets as requests need. max_queue: requests that may wait for a slot before
  `submit` raises QueueFull. `prefill`, `insert`, `generate` and `step` run in one thread at a time:
  the loop's once `start` is called; `submit` and `cancel` may be called from any thread.
  """

  def __init__(self, model: Model, *, max_slots: int = 8, max_len: int | None = None, max_queue: int = 64):
    if max_slots < 1 or max_queue < 0 or (max_len is not None and max_len < 2):
      raise ValueError(f"need max_slots >= 1, max_queue >= 0 and max_len >= 2; got {max_slots}, {max_queue}, {max_len}")
    context = model.config.decoder.max_position_embeddings
    self.model = model
    self.max_slots = max_slots
    self.max_len = min(max_len or context, context)
    self.max_queue = max_queue
    self._dtype = model.module().language_model.embed_tokens.compute_dtype
    self._slots: slots.Slots | None = None  # made at the first insert
    self._cache_len = 0
    # Each slot's end (its next write) after the steps dispatched so far, or FREE: the decode window.
    self._ends = np.full(max_slots, FREE)
    self._free = collections.deque(range(max_slots))  # the free-slot queue
    self._running: dict[int, Handle] = {}
    # The decode step dispatched last: its tokens (device) and the requests it decoded, by slot.
    self._in_flight: tuple[jax.Array, dict[int, Handle]] | None = None
    self._pending: collections.deque[Handle] = collections.deque()
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._drain = True

  @property
  def cache_len(self) -> int:
    """The cache's length now (slots per row; 0 before the first request)."""
    return self._cache_len

  # The device API (JetStream's): one thread at a time.

  def prefill(self, request: Request) -> Prefix:
    """Encodes the request's audio, writes its prompt into a cache of its own and chooses its first token."""
    return self._prefill(self._prepare(request))

  def insert(self, prefix: Prefix, slot: int) -> None:
    """Puts a prefilled request into `slot` (it must be free), growing the cache if the request needs more."""
    need, length = map(int, jax.device_get((prefix.need, prefix.length)))
    self._reserve(need)
    with jax.set_mesh(self.model.mesh):
      self._slots = slots.insert_fn(self._slots, prefix, np.int32(slot))
    self._ends[slot] = length

  def generate(self) -> np.ndarray:
    """Decodes one token for every slot; returns them (max_slots,), free slots' meaningless."""
    return np.asarray(self._decode(self._window()))

  def warmup(self, prompt_lengths: Iterable[int] = (), audio_windows: Iterable[int] = (0,)) -> None:
    """Compiles ahead of requests (call it before serving): grows the cache to `max_len`, then runs
    `prefill` and `insert` once for each bucket of `prompt_lengths` with each bucket of `audio_windows`
    (0: no audio) into a free slot, and a decode step once for each window (log2(max_len / MIN_CACHE)
    + 1 of them). Afterwards requests within those buckets compile nothing."""
    self._reserve(self.max_len)
    slot = self._free[0]
    cfg = self.model.config
    filler = (cfg.audio_token_id + 1) % cfg.decoder.vocab_size  # any id but audio: no frames to match
    for t in sorted({min(prompt_bucket(n, decode.MIN_BUCKET), self.max_len) for n in prompt_lengths}):
      for w in sorted({window_bucket(w) if w else 0 for w in audio_windows}):
        inputs = {"input_ids": np.full((1, t), filler, np.int32), "attention_mask": np.ones((1, t), bool)}
        if w:
          e = cfg.encoder
          inputs |= {"input_features": np.zeros((w, e.num_mel_bins, e.mel_frames), np.float32),
                     "input_features_mask": np.zeros((w, e.mel_frames), np.int32),
                     "audio_embed_mask": np.zeros((w, whisper.tokens_per_window(e)), bool)}
        job = _Job(inputs, t, Rows.of(Sampling()), jax.random.key(0)[None], frozenset(), 1, t)
        self.insert(self._prefill(job), slot)
    for window in sorted({self._length(MIN_CACHE << k) for k in range(self.max_len.bit_length())}):
      self._decode(window)
    self._ends[slot] = FREE

  # The scheduler.

  def submit(self, request: Request, listener: Callable[[int | None], None] | None = None) -> Handle:
    """Queues a request (any thread). Raises ValueError when it cannot run (bad inputs or settings, too
    long for max_len), QueueFull when max_queue requests wait, RuntimeError once `stop` was called."""
    return self._enqueue(Handle(self._prepare(request), listener), bounded=True)

  def cancel(self, handle: Handle) -> None:
    """Ends a request (any thread): a waiting one at once, a decoding one at the next step, which frees its
    slot; its finish_reason is "cancelled". A finished one is left as it is."""
    with self._lock:
      if handle in self._pending:
        self._pending.remove(handle)
        handle._finish("cancelled")
      handle.cancelled = True
      self._wake.notify()

  def step(self) -> None:
    """One turn: frees cancelled requests' slots, prefills waiting requests into free slots, starts a
    decode step for every slot, then hands out the tokens of the step before (waiting for it, not for
    the one just started) and frees the slots of requests that are done. A token decoded for a request
    that is no longer in its slot (it ended, or was cancelled, after that step started) is dropped."""
    for slot, handle in list(self._running.items()):
      if handle.cancelled:
        self._release(slot, "cancelled")
    while self._free and (handle := self._next_waiting()) is not None:
      self._admit(handle)
    previous, self._in_flight = self._in_flight, None
    if self._running:
      self._in_flight = self._decode(self._window()), dict(self._running)
    if previous is not None:
      tokens, decoded = np.asarray(previous[0]), previous[1]
      for slot, handle in decoded.items():
        if self._running.get(slot) is handle:
          self._emit(slot, int(tokens[slot]))

  def start(self) -> None:
    """Runs `step` in a background thread whenever there is work, until `stop`."""
    self._thread = threading.Thread(target=self._loop, name="af3-engine", daemon=True)
    self._thread.start()

  def stop(self, drain: bool = True) -> None:
    """Refuses new requests and ends the loop thread: with `drain`, after every submitted request is done;
    without, at once, cancelling them."""
    with self._lock:
      self._stopping, self._drain = True, drain
      self._wake.notify()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def __enter__(self) -> Engine:
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop(drain=exc[0] is None)

  def map(self, items: Iterable[Item], to_request: Callable[[Item], Request]) -> Iterator[tuple[Item, Completion | ValueError]]:
    """Answers `items` in their order: (item, its Completion), or (item, the ValueError) for one that
    `to_request` or the engine refuses. Items become requests lazily, about 2 * max_slots ahead of the
    oldest unanswered one; the loop runs in this thread unless `start` was called."""
    window: collections.deque[tuple[Item, Handle | ValueError]] = collections.deque()
    for item in items:
      try:
        window.append((item, self._enqueue(Handle(self._prepare(to_request(item))), bounded=False)))
      except ValueError as e:
        window.append((item, e))
      while window and (len(window) > 2 * self.max_slots or not isinstance(window[0][1], Handle) or window[0][1].done):
        yield self._settle(*window.popleft())
    while window:
      yield self._settle(*window.popleft())

  def _prepare(self, request: Request) -> _Job:
    """Checks a request on the host and pads it to its buckets; ValueError says what is wrong."""
    if request.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
    settings = self.model.generation.resolve(
        do_sample=request.do_sample, temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
        repetition_penalty=request.repetition_penalty, eos_token_id=request.eos_token_id)
    inputs = {k: np.asarray(v) for k, v in request.inputs.items() if v is not None}
    unknown = set(inputs) - {"input_ids", "attention_mask", *AUDIO}
    if unknown or "input_ids" not in inputs:
      raise ValueError(f"a request's inputs are input_ids and optionally attention_mask and {', '.join(AUDIO)}; "
                       f"got {sorted(inputs)}")
    ids = inputs.pop("input_ids")
    ids = ids[0] if ids.ndim == 2 and len(ids) == 1 else ids
    if ids.ndim != 1:
      raise ValueError(f"input_ids must be one row, (n,) or (1, n); got shape {ids.shape}")
    if "attention_mask" in inputs:  # padding is dropped: the engine pads to its own buckets
      ids = ids[np.broadcast_to(inputs.pop("attention_mask"), (1, len(ids)))[0].astype(bool)]
    check_inputs(self.model.config, input_ids=ids[None], **inputs)
    n = len(ids)
    if n < 1 or n + request.max_new_tokens > self.max_len:
      raise ValueError(f"the prompt has {n} tokens; with {request.max_new_tokens} new tokens that is more than "
                       f"the engine's max_len of {self.max_len}" if n else "the prompt is empty")
    t = min(prompt_bucket(n, decode.MIN_BUCKET), self.max_len)
    padded = {"input_ids": np.pad(ids.astype(np.int32), (0, t - n))[None], "attention_mask": np.arange(t)[None] < n}
    if "input_features" in inputs:
      if "audio_embed_mask" not in inputs:  # one program for both prompt styles: the mask is always given
        inputs["audio_embed_mask"] = audio_embed_mask_from_features(
            inputs["input_features_mask"], whisper.tokens_per_window(self.model.config.encoder))
      w = window_bucket(len(inputs["input_features"]))
      for name, dtype in zip(AUDIO, (np.float32, np.int32, bool)):  # fixed dtypes: one program
        x = np.asarray(inputs[name], dtype)
        padded[name] = np.pad(x, [(0, w - len(x))] + [(0, 0)] * (x.ndim - 1))
    return _Job(padded, n, Rows.of(settings.sampling), jax.random.key(request.seed)[None], frozenset(settings.eos_ids),
                request.max_new_tokens, n + request.max_new_tokens)

  def _prefill(self, job: _Job) -> Prefix:
    with jax.set_mesh(self.model.mesh):
      prefix, logits = slots.prefill_fn(self.model.graphdef, self.model.state, job.inputs, np.int32(job.length),
                                        np.int32(job.cache_len), job.rows, job.key)
      token, seen = slots.choose_fn(logits, prefix.seen, prefix.rows, prefix.key)
    return prefix.replace(token=token, seen=seen)

  def _length(self, need: int) -> int:
    """The bucket of `need` slots, at most max_len: the cache's lengths and the decode windows."""
    return min(bucket(need, MIN_CACHE), self.max_len)

  def _window(self) -> int:
    """The decode window: the bucket of slots that holds every live slot's next token. A slot decoded
    past the need it was inserted with (the device API lets a caller) reads the whole cache."""
    return min(self._length(int(self._ends.max()) + 1), self._cache_len)

  def _decode(self, window: int) -> jax.Array:
    """Dispatches one decode step reading the cache's first `window` slots; returns its tokens (B,),
    still on the device."""
    with jax.set_mesh(self.model.mesh):
      self._slots, tokens = slots.generate_fn(self.model.graphdef, self.model.state, self._slots, window=window)
    self._ends[self._ends != FREE] += 1
    return tokens

  def _reserve(self, need: int) -> None:
    """Makes the cache at least `need` slots long (a bucket, at most max_len)."""
    length = self._length(need)
    with jax.set_mesh(self.model.mesh):
      if self._slots is None:
        self._slots = slots.empty_fn(self.model.config, batch=self.max_slots, length=length, dtype=self._dtype)
      elif length > self._cache_len:
        self._slots = slots.grow_fn(self._slots, length=length)
    self._cache_len = max(self._cache_len, length)

  def _enqueue(self, handle: Handle, *, bounded: bool) -> Handle:
    with self._lock:
      if self._stopping:
        raise RuntimeError("the engine is stopping")
      if bounded and len(self._pending) >= self.max_queue:
        raise QueueFull(f"{len(self._pending)} requests are already waiting for a slot")
      self._pending.append(handle)
      self._wake.notify()
    return handle

  def _next_waiting(self) -> Handle | None:
    with self._lock:
      return self._pending.popleft() if self._pending else None

  def _admit(self, handle: Handle) -> None:
    """Prefills a waiting request into a free slot and hands out its first token."""
    slot = self._free.popleft()
    try:
      prefix = self._prefill(handle._job)
      self.insert(prefix, slot)
    except Exception as e:  # this request cannot run (too big for the device, say); the others go on
      self._free.appendleft(slot)
      handle._finish("error", e)
      return
    handle._job.inputs, handle.slot = None, slot  # the audio is in the cache now
    self._running[slot] = handle
    self._emit(slot, int(np.asarray(prefix.token)[0]))

  def _emit(self, slot: int, token: int) -> None:
    handle = self._running[slot]
    handle._push(token)
    if token in handle._job.eos:
      self._release(slot, "stop")
    elif len(handle._tokens) >= handle._job.max_new_tokens:
      self._release(slot, "length")

  def _release(self, slot: int, reason: str, error: BaseException | None = None) -> None:
    handle = self._running.pop(slot)
    handle.slot = None
    self._ends[slot] = FREE
    self._free.append(slot)
    handle._finish(reason, error)

  def _loop(self) -> None:
    while True:
      with self._lock:
        while not (self._pending or self._running or self._stopping):
          self._wake.wait()
        if self._stopping and not (self._drain and (self._pending or self._running)):
          break
      try:
        self.step()
      except Exception as e:  # the device state is lost: fail what runs, start afresh, keep serving
        for slot in list(self._running):
          self._release(slot, "error", e)
        self._slots, self._cache_len, self._in_flight = None, 0, None
    with self._lock:
      left, self._pending = [*self._pending, *self._running.values()], collections.deque()
    for handle in left:
      handle._finish("cancelled")
    self._running.clear()
    self._in_flight = None
    self._ends[:] = FREE
    self._free = collections.deque(range(self.max_slots))

  def _settle(self, item: Item, outcome: Handle | ValueError) -> tuple[Item, Completion | ValueError]:
    if isinstance(outcome, Handle):
      while self._thread is None and not outcome.done:
        self.step()
      outcome = outcome.result()
    return item, outcome
