"""The engine's decode state: one KV cache of B slots (rows) shared by requests of their own lengths,
and the pure jitted functions over it (`engine.Engine` drives them; JetStream's `engine_api.py` names
them): `prefill_fn` runs one request's audio encoder and prompt into a cache of its own, `choose_fn`
picks its first token, `insert_fn` copies that into a slot, `generate_fn` decodes one token for every
slot.

A slot is a cache row with its own end: the prompt fills slots 0..n-1 (right padded to its bucket, so a
token's slot is its position) and each new token goes after it. Each row's decoding settings are data
(`Rows`), so requests of any settings share one program, and a row's token is chosen as
`decode.process_logits` and `generate` choose it for that request alone: greedy tokens are equal, and a
draw uses the key fold_in(seed, step) over the row alone, so seeded samples are equal too.
Shape letters: B slots, T prompt bucket, S cache length, V vocab, L layers, K kv heads, H head dim,
W audio windows.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from af3_jax import decode, sharding
from af3_jax.generation import Sampling
from af3_jax.models import kv_cache, layers

TRACES: collections.Counter[str] = collections.Counter()  # traces of each jitted function, for recompile tests
AUDIO = ("input_features", "input_features_mask", "audio_embed_mask")


@struct.dataclass
class Rows:
  """Each row's decoding settings, (B,) each: do_sample bool; temperature; top_k (0: off); tail, the
  mass top-p drops (1 - top_p, 0: off); repetition_penalty (1: off)."""

  do_sample: jax.Array
  temperature: jax.Array
  top_k: jax.Array
  tail: jax.Array
  repetition_penalty: jax.Array

  @classmethod
  def of(cls, s: Sampling) -> Rows:
    """One row, in numpy. 1 - top_p is taken in float64, as `process_logits` takes it."""
    return cls(np.array([s.do_sample]), np.array([s.temperature], np.float32), np.array([s.top_k], np.int32),
               np.array([1 - s.top_p], np.float32), np.array([s.repetition_penalty], np.float32))


def _warp(scores: jax.Array, rows: Rows) -> jax.Array:
  """Temperature, top-k and top-p on (B, V) penalized scores, each row as `process_logits` with its own
  settings (one sort serves both cuts: cutting below a threshold keeps the sorted order)."""
  x = scores / rows.temperature[:, None]
  ascending = jnp.sort(x, axis=-1)
  v = x.shape[-1]
  k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, v), v)  # k = V keeps every token
  kth = jnp.take_along_axis(ascending, (v - k)[:, None], axis=-1)
  x, ascending = jnp.where(x < kth, -jnp.inf, x), jnp.where(ascending < kth, -jnp.inf, ascending)
  cutoff = decode.nucleus_cutoff(ascending, rows.tail[:, None])
  return jnp.where((rows.tail[:, None] > 0) & (x < cutoff), -jnp.inf, x)


def _choose(logits: jax.Array, seen: jax.Array, rows: Rows, key: jax.Array, step: jax.Array) -> jax.Array:
  """(B, V) logits -> (B,) int32 tokens. seen (B, V) bool (repetition penalty); key (B,) each row's
  seed; step (B,) the tokens each row has chosen so far."""
  scores = decode.penalize(logits.astype(jnp.float32), seen, rows.repetition_penalty[:, None])
  greedy = jnp.argmax(scores, axis=-1)

  def sample():
    # A draw over (1, V) per row, as `generate` draws for one request alone: the same noise.
    draw = lambda k, i, x: jax.random.categorical(jax.random.fold_in(k, i), x[None], axis=-1)[0]
    return jnp.where(rows.do_sample, jax.vmap(draw)(key, step, _warp(scores, rows)), greedy)

  return jax.lax.cond(rows.do_sample.any(), sample, lambda: greedy).astype(jnp.int32)


@struct.dataclass
class Prefix:
  """One prefilled request, ready to insert: k, v (L, 1, T, K, H); length () its prompt tokens; need ()
  the cache slots it will fill, prompt and new tokens; token (1,) its first; seen (1, V); rows (1,) its
  settings; key (1,)."""

  k: jax.Array
  v: jax.Array
  length: jax.Array
  need: jax.Array
  token: jax.Array
  seen: jax.Array
  rows: Rows
  key: jax.Array


@struct.dataclass
class Slots:
  """The decode state: cache (per-row ends: each row's next slot, which is its next position); token
  (B,) each row's latest; seen (B, V); step (B,) tokens chosen; rows (B,) settings; key (B,). Free rows
  decode too, unseen (their writes past the cache's end are dropped); `insert` resets a row."""

  cache: kv_cache.Cache
  token: jax.Array
  seen: jax.Array
  step: jax.Array
  rows: Rows
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef",), compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def prefill_fn(graphdef, params, inputs: dict[str, jax.Array], length: jax.Array, need: jax.Array, rows: Rows,
               key: jax.Array) -> tuple[Prefix, jax.Array]:
  """inputs: input_ids and attention_mask (1, T), right padded, and optionally the audio (W windows).
  -> the prefix, its token not chosen yet, and the last prompt token's logits (1, V). `choose_fn` chooses:
  the sampler compiled once, not into every prompt and audio bucket's program."""
  TRACES["prefill"] += 1
  model = nnx.merge(graphdef, params)
  ids, mask = inputs["input_ids"], inputs["attention_mask"]
  x = model.embed(ids, mask, **{k: inputs[k] for k in AUDIO if k in inputs})
  t, vocab = ids.shape[1], model.cfg.decoder.vocab_size
  h, cache = model.language_model(x, jnp.arange(t)[None], mask, kv_cache.init(model.cfg.decoder, 1, t, x.dtype),
                                  right_padded=True)
  logits = model.lm_head(jax.lax.dynamic_index_in_dim(h, length - 1, axis=1, keepdims=False))
  # Padding points at an extra column that is dropped, as in `decode.prefill`.
  seen = jnp.zeros((1, vocab + 1), bool).at[0, jnp.where(mask[0], ids[0], vocab)].set(True)[:, :vocab]
  prefix = Prefix(k=cache.k, v=cache.v, length=length, need=need, token=jnp.zeros((1,), jnp.int32), seen=seen,
                  rows=rows, key=key)
  return prefix, logits


@jax.jit
def choose_fn(logits: jax.Array, seen: jax.Array, rows: Rows, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A prefix's first token (1,) from its logits (1, V), and its `seen` with the token marked. Only (1, V)
  shapes: one program for every prompt bucket."""
  TRACES["choose"] += 1
  token = _choose(logits, seen, rows, key, jnp.zeros((1,), jnp.int32))
  return token, seen.at[0, token[0]].set(True)


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert_fn(slots: Slots, prefix: Prefix, slot: jax.Array) -> Slots:
  TRACES["insert"] += 1
  c = slots.cache
  at_slot = lambda rows, row: rows.at[slot].set(row[0])
  cache = kv_cache.Cache(
      k=jax.lax.dynamic_update_slice(c.k, prefix.k.astype(c.k.dtype), (0, slot, 0, 0, 0)),
      v=jax.lax.dynamic_update_slice(c.v, prefix.v.astype(c.v.dtype), (0, slot, 0, 0, 0)),
      key_mask=c.key_mask.at[slot].set(jnp.arange(c.key_mask.shape[1]) < prefix.length),
      end=c.end.at[slot].set(prefix.length))
  return Slots(cache=cache, token=at_slot(slots.token, prefix.token), seen=at_slot(slots.seen, prefix.seen),
               step=slots.step.at[slot].set(1), rows=jax.tree.map(at_slot, slots.rows, prefix.rows),
               key=at_slot(slots.key, prefix.key))


@functools.partial(jax.jit, static_argnames=("graphdef", "window"), donate_argnames=("slots",),
                   compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def generate_fn(graphdef, params, slots: Slots, *, window: int) -> tuple[Slots, jax.Array]:
  """Feeds every row its latest token (at position = its cache end) and chooses the next: the new state
  and the tokens (B,) apart from it, so that the host can read them after the next step took (donated)
  the state. Attention reads the cache's first `window` slots only: they must cover every live row's
  end (free rows decode garbage either way), so a step costs what its longest request needs, not what
  the cache holds."""
  TRACES["generate"] += 1
  model = nnx.merge(graphdef, params)
  x = model.language_model.embed_tokens(slots.token[:, None])
  b = x.shape[0]
  h, cache = model.language_model(x, slots.cache.end[:, None], jnp.ones((b, 1), bool), slots.cache, window=window)
  token = _choose(model.lm_head(h[:, 0]), slots.seen, slots.rows, slots.key, slots.step)
  return slots.replace(cache=cache, token=token, seen=slots.seen.at[jnp.arange(b), token].set(True),
                       step=slots.step + 1), token


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "length", "dtype"))
def empty_fn(cfg, *, batch: int, length: int, dtype) -> Slots:
  TRACES["empty"] += 1
  rows = Rows(*(jnp.zeros((batch,), t) for t in (bool, jnp.float32, jnp.int32, jnp.float32, jnp.float32)))
  return Slots(cache=kv_cache.init(cfg.decoder, batch, length, dtype, per_row=True), token=jnp.zeros((batch,), jnp.int32),
               seen=jnp.zeros((batch, cfg.decoder.vocab_size), bool), step=jnp.zeros((batch,), jnp.int32), rows=rows,
               key=jax.random.split(jax.random.key(0), batch))


@functools.partial(jax.jit, static_argnames=("length",))  # no donation: the old cache cannot hold the new
def grow_fn(slots: Slots, *, length: int) -> Slots:
  """The cache lengthened to `length` slots; the rows keep their contents (the new slots are masked)."""
  TRACES["grow"] += 1
  c = slots.cache
  wider = lambda x, axis: jnp.pad(x, [(0, length - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])
  cache = c.replace(k=sharding.constrain(wider(c.k, 2), kv_cache.AXES),
                    v=sharding.constrain(wider(c.v, 2), kv_cache.AXES), key_mask=wider(c.key_mask, 1))
  return slots.replace(cache=cache)

