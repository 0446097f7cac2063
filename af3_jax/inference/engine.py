"""Continuous batching: requests come and go while up to `max_slots` of them decode together in one
shared KV cache (`slots.py`), each getting the tokens `decode.generate` would give it alone.

`Engine` drives `slots`' programs, which follow JetStream's engine API (`engine_api.py`): the prefill runs
requests' audio encoder and prompts and chooses their first tokens, the insert puts them into free slots,
the decode step decodes for every slot. `step` is one turn of the loop over them (JetStream's
orchestrator): it frees cancelled requests' slots, prefills waiting requests into free slots (a free-slot
queue), several at once (one encoder call over all their windows, one prefill call over their rows, up to
`prefill_tokens` padded prompt tokens), starts a decode dispatch, and hands out the tokens of the dispatch
before, freeing each slot whose request is done (an eos id, or max_new_tokens) at once. A dispatch decodes
up to `decode_steps` tokens for every slot (by default 1; more is vLLM's multi-step scheduling: the host
reads tokens once per dispatch, and a slot stops on the device at its eos or its budget). So the device decodes while the host
reads tokens and schedules, never waiting for it; the price is decoding a slot whose request ended in the
dispatch before, whose tokens are dropped (a new request in that slot is inserted after it, in device
order).

Shapes: prefill batches are padded to a few shapes (`requests.Shape`), slots are fixed, and the cache
grows by buckets (at least `MIN_CACHE`) up to `max_len`. A dispatch reads only a window of the cache,
the bucket that covers its longest live request's end after the dispatch (the engine knows each slot's
end on the host), so short requests in a long cache decode at short requests' cost. `warmup` (or
`compile_prefill` and `compile_decode`, from any thread) compiles programs ahead without running them;
a request of a shape not compiled yet compiles it first, so it is only slower.

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
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import jax
import numpy as np

from af3_jax.buckets import bucket
from af3_jax.checkpoints.pretrained import Model
from af3_jax.inference import requests, slots
from af3_jax.inference.requests import Completion, Handle, Job, QueueFull, Request, Shape
from af3_jax.inference.slots import Prefix

__all__ = ["Completion", "Engine", "Handle", "QueueFull", "Request", "Shape"]

Item = TypeVar("Item")
# The cache's shortest length, and the decode window's shortest: each length and window is a compile of
# the decode step, and a 30 s clip with its answer is about 1,000 tokens anyway.
MIN_CACHE = 1024
# Tokens a slot decodes per dispatch by default: one. Several run in a `lax.while_loop`, inside which
# XLA:GPU copies every layer's slice of the stacked MLP kernels before its matmul, every step
# (tests/inference/test_decode_gpu.py); the host reading one dispatch behind keeps the device busy anyway.
DECODE_STEPS = 1
FREE = -1  # the host's end of a slot that holds no request


class Engine:
  """Continuous batching over `max_slots` slots (see the module docstring).

  max_len: the most a request may hold, prompt plus new tokens (default: the model's context); the
  cache grows to it by buckets as requests need. max_queue: requests that may wait for a slot before
  `submit` raises QueueFull. decode_steps: the most tokens a slot decodes per dispatch (1: one host
  round trip per token). prefill_tokens: the most padded prompt tokens one prefill call takes (rows x
  prompt bucket); a longer request goes alone. `step` runs in one thread at a time, the loop's once
  `start` is called; `submit` and `cancel` may be called from any thread, `compile_prefill` and
  `compile_decode` too.
  """

  def __init__(self, model: Model, *, max_slots: int = 8, max_len: int | None = None, max_queue: int = 64,
               decode_steps: int = DECODE_STEPS, prefill_tokens: int = 8192):
    if max_slots < 1 or max_queue < 0 or (max_len is not None and max_len < 2) or decode_steps < 1:
      raise ValueError(f"need max_slots >= 1, max_queue >= 0, max_len >= 2 and decode_steps >= 1; got "
                       f"{max_slots}, {max_queue}, {max_len}, {decode_steps}")
    context = model.config.decoder.max_position_embeddings
    self.model = model
    self.max_slots = max_slots
    self.max_len = min(max_len or context, context)
    self.max_queue = max_queue
    self.decode_steps = decode_steps
    self.prefill_tokens = prefill_tokens
    self._dtype = model.module().language_model.embed_tokens.compute_dtype
    self._slots: slots.Slots | None = None  # made at the first insert
    self._abstract_slots = None  # their shapes and shardings, for compiling ahead
    self._cache_len = 0
    # Each slot's end (its next write) after the dispatches so far, or FREE; and the tokens the host still
    # wants from it beyond those dispatched.
    self._ends = np.full(max_slots, FREE)
    self._left = np.zeros(max_slots, np.int32)
    self._free = collections.deque(range(max_slots))  # the free-slot queue
    self._running: dict[int, Handle] = {}
    # The dispatch made last: its tokens (device, (decode_steps, B)) and the requests it decoded, by slot.
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

  def reserve(self, need: int) -> None:
    """Makes the cache at least `need` slots long (a bucket, at most max_len): before compiling ahead, its
    final length (the programs compiled ahead are for the cache's length then)."""
    length = self.length_bucket(need)
    with jax.set_mesh(self.model.mesh):
      if self._slots is None:
        self._slots = slots.empty_fn(self.model.config, batch=self.max_slots, length=length, dtype=self._dtype)
      elif length > self._cache_len:
        self._slots = slots.grow_fn(self._slots, length=length)
      else:
        return
    self._cache_len = length
    self._abstract_slots = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                        self._slots)

  def warmup(self, prompt_lengths: Iterable[int] = (), audio_windows: Iterable[int] = (0,),
             rows: Iterable[int] = (1,)) -> None:
    """Compiles ahead of requests, without running anything: grows the cache to `max_len`, then compiles
    the prefill of each shape that `rows` requests of `prompt_lengths` tokens with `audio_windows`
    windows (0: no audio) take, and a decode dispatch for every window. Afterwards requests of those
    shapes compile nothing."""
    self.reserve(self.max_len)
    shapes = {Shape.of(r, n, w, self.max_len) for r in rows for n in prompt_lengths for w in audio_windows}
    for shape in sorted(shapes):
      self.compile_prefill(shape)
    for window in self.decode_windows():
      self.compile_decode(window)

  def length_bucket(self, need: int) -> int:
    """The bucket of `need` slots, at most max_len: the cache's lengths and the decode windows."""
    return min(bucket(need, MIN_CACHE), self.max_len)

  def decode_windows(self) -> list[int]:
    """Every window a decode dispatch can read, shortest first."""
    return sorted({self.length_bucket(n) for n in range(1, self.max_len + 1)})

  def compile_prefill(self, shape: Shape) -> None:
    """Compiles (without running) what admitting a batch of `shape` runs: the prefill, the first tokens'
    choice and the insert. Any thread; the cache must have its final length (`warmup` makes it so)."""
    job = requests.dummy(self.model, shape)
    args = requests.batch([job], shape, requests.filler_id(self.model))
    with jax.set_mesh(self.model.mesh):
      prefix, logits = _compiled(slots.prefill_fn, self.model.graphdef, self.model.state, *args)
      token, seen = _compiled(slots.choose_fn, logits, prefix.seen, prefix.rows, prefix.key)
      _compiled(slots.insert_fn, self._abstract_slots, prefix.replace(token=token, seen=seen),
                np.zeros(shape.rows, np.int32))

  def compile_decode(self, window: int) -> None:
    """Compiles (without running) a decode dispatch reading `window` slots. Any thread, as `compile_prefill`."""
    with jax.set_mesh(self.model.mesh):
      _compiled(slots.decode_fn, self.model.graphdef, self.model.state, self._abstract_slots,
                np.zeros(self.max_slots, np.int32), window=window, steps=self.decode_steps)

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
    decode dispatch for the slots that want tokens, then hands out the tokens of the dispatch before
    (waiting for it, not for the one just started) and frees the slots of requests that are done. Tokens
    decoded for a request that is no longer in its slot (it ended, or was cancelled, after that dispatch
    started) are dropped."""
    for slot, handle in list(self._running.items()):
      if handle.cancelled:
        self._release(slot, "cancelled")
    while self._free and (group := self._next_waiting()):
      self._admit(group)
    previous, self._in_flight = self._in_flight, None
    if self._left.any():
      self._in_flight = self._decode(self._left), dict(self._running)
    if previous is not None:
      tokens, decoded = np.asarray(previous[0]), previous[1]
      for slot, handle in decoded.items():
        for token in tokens[:, slot]:
          if token < 0 or self._running.get(slot) is not handle:
            break
          self._emit(slot, int(token))

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

  def _prepare(self, request: Request) -> Job:
    return requests.prepare(self.model, request, self.max_len)

  def _prefill(self, jobs: Sequence[Job]) -> Prefix:
    """Prefills `jobs` in one batch (its rows past theirs are padding) and chooses their first tokens."""
    args = requests.batch(jobs, requests.shape_of(jobs, self.max_len), requests.filler_id(self.model))
    with jax.set_mesh(self.model.mesh):
      prefix, logits = slots.prefill_fn(self.model.graphdef, self.model.state, *args)
      token, seen = slots.choose_fn(logits, prefix.seen, prefix.rows, prefix.key)
    return prefix.replace(token=token, seen=seen)

  def _insert(self, prefix: Prefix, slot_ids: Sequence[int], lengths, needs) -> None:
    """Inserts the prefix's first len(slot_ids) rows into those slots (the rest are padding, dropped)."""
    self.reserve(int(max(needs)))
    index = np.full(prefix.token.shape[0], self.max_slots, np.int32)  # out of range: dropped
    index[:len(slot_ids)] = slot_ids
    with jax.set_mesh(self.model.mesh):
      self._slots = slots.insert_fn(self._slots, prefix, index)
    for slot, length, need in zip(slot_ids, lengths, needs):
      self._ends[slot], self._left[slot] = length, need - length - 1  # the first token is chosen

  def _decode(self, left: np.ndarray) -> jax.Array:
    """Dispatches a decode of up to `decode_steps` tokens for the slots with `left` (B,) > 0, reading the
    cache's first slots up to where the furthest of them will end; returns its tokens (decode_steps, B),
    still on the device."""
    n = min(self.decode_steps, int(left.max()))
    window = min(self.length_bucket(int(self._ends[left > 0].max()) + n), self._cache_len)
    with jax.set_mesh(self.model.mesh):
      self._slots, tokens = slots.decode_fn(self.model.graphdef, self.model.state, self._slots,
                                            left.astype(np.int32), window=window, steps=self.decode_steps)
    self._ends[self._ends != FREE] += n  # every row moves on with the dispatch, stopped ones too
    self._left -= np.minimum(self._left, n)
    return tokens

  def _enqueue(self, handle: Handle, *, bounded: bool) -> Handle:
    with self._lock:
      if self._stopping:
        raise RuntimeError("the engine is stopping")
      if bounded and len(self._pending) >= self.max_queue:
        raise QueueFull(f"{len(self._pending)} requests are already waiting for a slot")
      self._pending.append(handle)
      self._wake.notify()
    return handle

  def _next_waiting(self) -> list[Handle]:
    """The waiting requests to prefill together, oldest first: as many as there are free slots, while
    their padded prompts stay within `prefill_tokens` (one always goes)."""
    group: list[Handle] = []
    with self._lock:
      while self._pending and len(group) < len(self._free):
        shape = requests.shape_of([h._job for h in group] + [self._pending[0]._job], self.max_len)
        if group and shape.rows * shape.prompt > self.prefill_tokens:
          break
        group.append(self._pending.popleft())
    return group

  def _admit(self, group: list[Handle]) -> None:
    """Prefills waiting requests into free slots and hands out their first tokens."""
    slot_ids = [self._free.popleft() for _ in group]
    jobs = [h._job for h in group]
    try:
      prefix = self._prefill(jobs)
      self._insert(prefix, slot_ids, [j.length for j in jobs], [j.need for j in jobs])
    except Exception as e:  # these requests cannot run (too big for the device, say); the others go on
      self._free.extendleft(reversed(slot_ids))
      for handle in group:
        handle._finish("error", e)
      return
    for slot, handle, token in zip(slot_ids, group, np.asarray(prefix.token)):
      handle._job.drop_inputs()  # the prompt and audio are in the cache now
      handle.slot = slot
      self._running[slot] = handle
      self._emit(slot, int(token))

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
    self._ends[slot], self._left[slot] = FREE, 0
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
    self._ends[:], self._left[:] = FREE, 0
    self._free = collections.deque(range(self.max_slots))

  def _settle(self, item: Item, outcome: Handle | ValueError) -> tuple[Item, Completion | ValueError]:
    if isinstance(outcome, Handle):
      while self._thread is None and not outcome.done:
        self.step()
      outcome = outcome.result()
    return item, outcome


def _compiled(fn, *args, **static):
  """Compiles `fn` (a jitted function) for `args` ahead of time, as a call with arguments of those shapes
  and shardings would (jax reuses the executable for that call; with the persistent cache on, so does
  a later process); returns its outputs' shapes and shardings, to compile what takes them next."""
  lowered = fn.lower(*args, **static)
  compiled = lowered.compile()
  return jax.tree.map(lambda out, sharding: jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding),
                      lowered.out_info, compiled.output_shardings)
