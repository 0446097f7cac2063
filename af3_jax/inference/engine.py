"""Continuous batching: requests come and go while up to `max_slots` of them decode together in one
shared KV cache (`batch.DecodeBatch` over `slots`' programs), each getting the tokens `decode.generate`
would give it alone.

The programs follow JetStream's engine API: the prefill runs requests' audio encoder and prompts and
chooses their first tokens, the insert puts them into free slots, the decode step decodes for every slot.
`step` is one turn of the loop over them (JetStream's orchestrator): it frees cancelled requests' slots,
prefills waiting requests into free slots (a free-slot queue), several at once (one encoder call over all
their windows, one prefill call over their rows, up to `prefill_tokens` padded prompt tokens), starts a
decode dispatch, and hands out the tokens of the dispatch before, freeing each slot whose request is done
(an eos id, or max_new_tokens) at once. A dispatch decodes up to `decode_steps` tokens for every slot (by
default 1; more is vLLM's multi-step scheduling: the host reads tokens once per dispatch, and a slot
stops on the device at its eos or its budget). So the device decodes while the host reads tokens and
schedules, never waiting for it; the price is decoding a slot whose request ended in the dispatch
before, whose tokens are dropped (a new request in that slot is inserted after it, in device order).

Prefill batches are padded to a few shapes (`requests.Shape`), slots are fixed, and the cache and the
decode windows come in buckets (`batch`); `warmup` compiles them ahead, and a request of a shape not
compiled yet compiles it first, so it is only slower.

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
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import jax
import numpy as np

from af3_jax.checkpoints.pretrained import Model
from af3_jax.inference import requests
from af3_jax.inference.batch import DecodeBatch
from af3_jax.inference.requests import Completion, Handle, Job, QueueFull, Request, Shape

__all__ = ["Completion", "Engine", "Handle", "QueueFull", "Request", "Shape"]

Item = TypeVar("Item")
# Tokens a slot decodes per dispatch by default: one. Several run in a `lax.while_loop`, inside which
# XLA:GPU copies every layer's slice of the stacked MLP kernels before its matmul, every step
# (tests/inference/test_decode_gpu.py); the host reading one dispatch behind keeps the device busy anyway.
DECODE_STEPS = 1


class Engine:
  """Continuous batching over `max_slots` slots (see the module docstring).

  max_len: the most a request may hold, prompt plus new tokens (default: the model's context); the
  cache grows to it by buckets as requests need. max_queue: requests that may wait for a slot before
  `submit` raises QueueFull. decode_steps: the most tokens a slot decodes per dispatch (1: one host
  round trip per token). prefill_tokens: the most padded prompt tokens one prefill call takes (rows x
  prompt bucket); a longer request goes alone. `step` runs in one thread at a time, the loop's once
  `start` is called; `submit` and `cancel` may be called from any thread, `batch.compile_prefill` and
  `batch.compile_decode` too (the cache at its final length: `warmup` and `batch.reserve` set it).
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
    self.prefill_tokens = prefill_tokens
    self.batch = DecodeBatch(model, max_slots=max_slots, max_len=self.max_len, decode_steps=decode_steps)
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
  def decode_steps(self) -> int:
    return self.batch.decode_steps

  def warmup(self, prompt_lengths: Iterable[int] = (), audio_windows: Iterable[int] = (0,),
             rows: Iterable[int] = (1,)) -> None:
    """Compiles ahead of requests without running anything (`DecodeBatch.warmup`): afterwards requests of
    `rows` x `prompt_lengths` tokens with `audio_windows` windows (0: no audio) compile nothing."""
    self.batch.warmup(prompt_lengths, audio_windows, rows)

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
    if self.batch.left.any():
      self._in_flight = self.batch.decode(), dict(self._running)
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
      prefix = self.batch.prefill(jobs)
      self.batch.insert(prefix, slot_ids, jobs)
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
    self.batch.free(slot)
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
        self.batch.reset(lost=True)
        self._in_flight = None
    with self._lock:
      left, self._pending = [*self._pending, *self._running.values()], collections.deque()
    for handle in left:
      handle._finish("cancelled")
    self._running.clear()
    self._in_flight = None
    self.batch.reset(lost=False)
    self._free = collections.deque(range(self.max_slots))

  def _settle(self, item: Item, outcome: Handle | ValueError) -> tuple[Item, Completion | ValueError]:
    if isinstance(outcome, Handle):
      while self._thread is None and not outcome.done:
        self.step()
      outcome = outcome.result()
    return item, outcome

