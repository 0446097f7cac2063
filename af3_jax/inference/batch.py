"""The engine's decoding batch: `max_slots` slots of one KV cache on the device (`slots.Slots`) and what
the host knows of them, each slot's end and the tokens it still wants, so that it never reads them back.

The cache grows by buckets (at least `MIN_CACHE`) up to `max_len`. A decode dispatch reads only a window
of it, the bucket that covers its longest live request's end after the dispatch, so short requests in a
long cache decode at short requests' cost. Each cache length and each window is a compile of the decode
step; `warmup` (or `compile_prefill` and `compile_decode`, from any thread) compiles them ahead without
running anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import numpy as np

from af3_jax.buckets import bucket
from af3_jax.checkpoints.pretrained import Model
from af3_jax.inference import requests, slots
from af3_jax.inference.requests import Job, Shape
from af3_jax.inference.slots import Prefix

# The cache's shortest length, and the decode window's shortest: each length and window is a compile of
# the decode step, and a 30 s clip with its answer is about 1,000 tokens anyway.
MIN_CACHE = 1024
FREE = -1  # the host's end of a slot that holds no request


class DecodeBatch:
  """The slots on the device and the host's view of them (see the module docstring). decode_steps: the
  most tokens a slot decodes per dispatch. `compile_prefill` and `compile_decode` may run in any thread;
  the rest in the engine's."""

  def __init__(self, model: Model, *, max_slots: int, max_len: int, decode_steps: int):
    self.model = model
    self.max_slots = max_slots
    self.max_len = max_len
    self.decode_steps = decode_steps
    self.dtype = model.module().language_model.embed_tokens.compute_dtype
    self._slots: slots.Slots | None = None  # made at the first insert
    self._abstract_slots = None  # their shapes and shardings, for compiling ahead
    self._cache_len = 0
    # Each slot's end (its next write) after the dispatches so far, or FREE; and the tokens the host still
    # wants from it beyond those dispatched.
    self.ends = np.full(max_slots, FREE)
    self.left = np.zeros(max_slots, np.int32)

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
        self._slots = slots.empty_fn(self.model.config, batch=self.max_slots, length=length, dtype=self.dtype)
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
    args = requests.dummy_batch(self.model.config, shape)
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

  def prefill(self, jobs: Sequence[Job]) -> Prefix:
    """Prefills `jobs` in one batch (its rows past theirs are padding) and chooses their first tokens."""
    args = requests.batch(jobs, requests.shape_of(jobs, self.max_len), requests.filler_id(self.model.config))
    with jax.set_mesh(self.model.mesh):
      prefix, logits = slots.prefill_fn(self.model.graphdef, self.model.state, *args)
      token, seen = slots.choose_fn(logits, prefix.seen, prefix.rows, prefix.key)
    return prefix.replace(token=token, seen=seen)

  def insert(self, prefix: Prefix, slot_ids: Sequence[int], jobs: Sequence[Job]) -> None:
    """Inserts the prefix's first len(slot_ids) rows, `jobs`' prefills, into those slots (the rest are
    padding, dropped), growing the cache first when they need it."""
    self.reserve(max(j.need for j in jobs))
    index = np.full(prefix.token.shape[0], self.max_slots, np.int32)  # out of range: dropped
    index[:len(slot_ids)] = slot_ids
    with jax.set_mesh(self.model.mesh):
      self._slots = slots.insert_fn(self._slots, prefix, index)
    for slot, job in zip(slot_ids, jobs):
      self.ends[slot], self.left[slot] = job.length, job.need - job.length - 1  # the first token is chosen

  def decode(self) -> jax.Array:
    """Dispatches a decode of up to `decode_steps` tokens for the slots that want tokens, reading the
    cache's first slots up to where the furthest of them will end; returns its tokens (decode_steps, B),
    still on the device."""
    n = min(self.decode_steps, int(self.left.max()))
    window = min(self.length_bucket(int(self.ends[self.left > 0].max()) + n), self._cache_len)
    with jax.set_mesh(self.model.mesh):  # `left` copied: the dispatch may still read it when it changes below
      self._slots, tokens = slots.decode_fn(self.model.graphdef, self.model.state, self._slots,
                                            self.left.copy(), window=window, steps=self.decode_steps)
    self.ends[self.ends != FREE] += n  # every row moves on with the dispatch, stopped ones too
    self.left -= np.minimum(self.left, n)
    return tokens

  def free(self, slot: int) -> None:
    """Forgets a slot's request: it wants no more tokens, and its cache row is the next request's."""
    self.ends[slot], self.left[slot] = FREE, 0

  def reset(self, *, lost: bool) -> None:
    """Frees every slot; `lost`: the device state is lost too (a failed step), so the next insert makes
    a new cache."""
    self.ends[:], self.left[:] = FREE, 0
    if lost:
      self._slots, self._abstract_slots, self._cache_len = None, None, 0


def _compiled(fn, *args, **static):
  """Compiles `fn` (a jitted function) for `args` ahead of time, as a call with arguments of those shapes
  and shardings would (jax reuses the executable for that call; with the persistent cache on, so does
  a later process); returns its outputs' shapes and shardings, to compile what takes them next."""
  lowered = fn.lower(*args, **static)
  compiled = lowered.compile()
  return jax.tree.map(lambda out, sharding: jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding),
                      lowered.out_info, compiled.output_shardings)
