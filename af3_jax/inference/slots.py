"""The one generation path's device side: a KV cache of B slots (rows), each holding a request of its own
length, and the pure functions over it, each also jitted as a program (JetStream's `engine_api.py` names
them): `prefill` runs several requests' audio encoder (one call over all their windows) and prompts (one
call over their rows) into a cache of their own, `choose` picks their first tokens, `insert` copies them
into slots, `decode` runs up to `steps` decode steps for every slot. `engine.Engine` drives the jitted
programs for many requests; `decode.generate` and `decode.generate_stream` run a batch's start (prefill,
choose) as one program, then `decode_fn` once per token.

A slot is a cache row with its own end: the prompt fills slots 0..n-1 (right padded to its bucket, so a
token's slot is its position) and each new token goes after it. Each row's decoding settings are data
(`generation.Rows`), so requests of any settings share one program; the sampler (`sample`) applies
transformers' processors in their order (repetition penalty, then when sampling temperature, top-k and
top-p) and draws a row's sample with the key fold_in(its seed, its step) over that row alone, so a
request's tokens do not depend on the rows beside it. Samples come from `jax.random` (seeded,
reproducible), so they are not torch's samples.
A multi-step decode (vLLM's multi-step scheduling) runs while any slot is active: a slot stops at its
budget (`left`, the tokens the host still wants from it) or at one of its eos ids (`eos`; `stopped`
keeps that across dispatches), and what a stopped slot decodes afterwards is -1 in the output. So the
host reads tokens once per dispatch, not once per token, and a dispatch whose slots all stop early ends
early.
Shape letters: B slots, P prefilled rows, T prompt bucket, S cache length, V vocab, L layers, K kv
heads, H head dim, W audio windows, E eos ids a slot watches, N steps a dispatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from af3_jax import sharding
from af3_jax.checkpoints.pretrained import AUDIO_INPUTS as AUDIO
from af3_jax.generation import Rows, Sampling
from af3_jax.models import kv_cache, layers

EOS_IDS = 8  # eos ids a slot watches on the device; the host checks every one (this only ends a dispatch early)


def penalize(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
  """RepetitionPenaltyLogitsProcessor on (B, V) logits; penalty (B, 1) (1 changes nothing)."""
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def nucleus_cutoff(ascending: jax.Array, tail: jax.Array) -> jax.Array:
  """TopPLogitsWarper's threshold (B, 1) from each row's scores sorted ascending (B, V): scores below it
  are dropped, the low tail holding at most `tail` (B, 1) = 1 - top_p of the mass; the top one stays."""
  drop = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= tail
  drop = drop.at[:, -1].set(False)
  # `drop` is a prefix of the ascending order, so a threshold finds it without a scatter (an exact tie
  # straddling the cut is kept whole, where torch's sort order would split it).
  return jnp.take_along_axis(ascending, drop.sum(-1, keepdims=True), axis=-1)


def _warp(scores: jax.Array, rows: Rows) -> jax.Array:
  """Temperature, top-k and top-p on (B, V) penalized scores, each row with its own settings (one sort
  serves both cuts: cutting below a threshold keeps the sorted order)."""
  x = scores / rows.temperature[:, None]  # TemperatureLogitsWarper
  ascending = jnp.sort(x, axis=-1)
  v = x.shape[-1]
  k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, v), v)  # k = V keeps every token
  kth = jnp.take_along_axis(ascending, (v - k)[:, None], axis=-1)  # TopKLogitsWarper: ties with the k-th stay
  x, ascending = jnp.where(x < kth, -jnp.inf, x), jnp.where(ascending < kth, -jnp.inf, ascending)
  cutoff = nucleus_cutoff(ascending, rows.tail[:, None])
  return jnp.where((rows.tail[:, None] > 0) & (x < cutoff), -jnp.inf, x)


def process_logits(logits: jax.Array, seen: jax.Array, rows: Rows) -> jax.Array:
  """(B, V) logits -> the scores transformers' processors give each row for its settings; seen (B, V)
  bool marks the tokens in its prompt (padding excluded) and its output so far."""
  scores = penalize(logits.astype(jnp.float32), seen, rows.repetition_penalty[:, None])
  return jnp.where(rows.do_sample[:, None], _warp(scores, rows), scores)


def sample(logits: jax.Array, seen: jax.Array, rows: Rows, key: jax.Array, step: jax.Array) -> jax.Array:
  """The sampler: (B, V) logits -> (B,) int32 tokens, each row's as `process_logits` scores it (greedy:
  the best). seen (B, V) bool; key (B,) each row's seed; step (B,) the tokens each row has chosen."""
  greedy = jnp.argmax(penalize(logits.astype(jnp.float32), seen, rows.repetition_penalty[:, None]), axis=-1)

  def draw():  # only when a row samples: the warpers sort the vocabulary
    # A draw over (1, V) per row, as for the request alone: the same noise whatever rows are beside it.
    one = lambda k, i, x: jax.random.categorical(jax.random.fold_in(k, i), x[None], axis=-1)[0]
    return jnp.where(rows.do_sample, jax.vmap(one)(key, step, process_logits(logits, seen, rows)), greedy)

  return jax.lax.cond(rows.do_sample.any(), draw, lambda: greedy).astype(jnp.int32)


def eos_row(ids) -> np.ndarray:
  """A request's eos ids as the device watches them: (E,) int32, -1 (never a token) past them."""
  row = np.full(EOS_IDS, -1, np.int32)
  ids = list(ids)[:EOS_IDS]
  row[:len(ids)] = ids
  return row


@struct.dataclass
class Prefix:
  """P prefilled requests, ready to insert: k, v (L, P, T, K, H); length (P,) their prompt tokens; need
  (P,) the cache slots each will fill, prompt and new tokens; token (P,) their first; seen (P, V); rows
  (P,) their settings; key (P,); eos (P, E) the ids each stops at (`eos_row`)."""

  k: jax.Array
  v: jax.Array
  length: jax.Array
  need: jax.Array
  token: jax.Array
  seen: jax.Array
  rows: Rows
  key: jax.Array
  eos: jax.Array


@struct.dataclass
class Slots:
  """The decode state: cache (per-row ends: each row's next slot, which is its next position); token
  (B,) each row's latest; seen (B, V); step (B,) tokens chosen; rows (B,) settings; key (B,); eos (B,
  E); stopped (B,) bool, the row chose one of its eos ids. Free and stopped rows decode too, unseen
  (their writes past the cache's end are dropped); `insert` resets a row."""

  cache: kv_cache.Cache
  token: jax.Array
  seen: jax.Array
  step: jax.Array
  rows: Rows
  key: jax.Array
  eos: jax.Array
  stopped: jax.Array


def prefill(model, inputs: dict[str, jax.Array], length: jax.Array, need: jax.Array, rows: Rows,
            seed: jax.Array, eos: jax.Array, *, room: int = 0) -> tuple[Prefix, jax.Array]:
  """inputs: input_ids and attention_mask (P, T), right padded, and optionally the audio: the windows of
  every row, row after row (W, ...), which fill the rows' `<sound>` tokens in that order. length, need
  (P,); seed (P,) int32, each row's key is jax.random.key(seed); eos (P, E). room (static): cache slots
  after the prompt bucket (0: the engine inserts the rows into its own cache; `decode.start` decodes
  in this one). -> the prefix, its tokens not chosen yet, and each row's last prompt token's logits (P, V).
  Right padding, not left: a row's positions are then its slots (0..n-1, transformers' cumsum(mask) - 1
  for the left-padded prompt), its new tokens go after them in its own row, and attention kernels take
  the padding as each row's length (cuDNN's sequence lengths, `models/attention.py`) instead of a mask."""
  ids, mask = inputs["input_ids"], inputs["attention_mask"].astype(bool)
  x = model.embed(ids, mask, **{k: inputs[k] for k in AUDIO if k in inputs})
  (p, t), vocab = ids.shape, model.cfg.decoder.vocab_size
  positions = jnp.broadcast_to(jnp.arange(t), (p, t))
  h, cache = model.language_model(x, positions, mask, kv_cache.init(model.cfg.decoder, p, t + room, x.dtype),
                                  right_padded=True)
  logits = model.lm_head(jnp.take_along_axis(h, (length - 1)[:, None, None], axis=1)[:, 0])
  # Padding points at an extra column that is dropped (transformers' RepetitionPenaltyLogitsProcessor
  # sees the prompt's tokens, not its padding).
  seen = jnp.zeros((p, vocab + 1), bool).at[jnp.arange(p)[:, None], jnp.where(mask, ids, vocab)].set(True)
  prefix = Prefix(k=cache.k, v=cache.v, length=length, need=need, token=jnp.zeros((p,), jnp.int32),
                  seen=seen[:, :vocab], rows=rows, key=jax.vmap(jax.random.key)(seed), eos=eos)
  return prefix, logits


def choose(logits: jax.Array, seen: jax.Array, rows: Rows, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The prefix rows' first tokens (P,) from their logits (P, V), and their `seen` with the tokens marked."""
  p = logits.shape[0]
  token = sample(logits, seen, rows, key, jnp.zeros((p,), jnp.int32))
  return token, seen.at[jnp.arange(p), token].set(True)


def own(prefix: Prefix) -> Slots:
  """The prefix's rows as a decode state of their own, in the cache the prefill wrote (its prompt
  bucket and `room`): each row's end at its prompt's end."""
  s = prefix.k.shape[2]
  cache = kv_cache.Cache(k=prefix.k, v=prefix.v, key_mask=jnp.arange(s) < prefix.length[:, None], end=prefix.length)
  return Slots(cache=cache, token=prefix.token, seen=prefix.seen, step=jnp.ones_like(prefix.length), rows=prefix.rows,
               key=prefix.key, eos=prefix.eos, stopped=(prefix.token[:, None] == prefix.eos).any(-1))


def insert(slots: Slots, prefix: Prefix, slot: jax.Array) -> Slots:
  """Puts prefix row i into slot[i] (P,); a slot index out of range (B) drops its row (padding rows)."""
  new, c = own(prefix), slots.cache
  at_slots = lambda rows, x: rows.at[slot].set(x.astype(rows.dtype), mode="drop")
  t = prefix.k.shape[2]
  cache = kv_cache.Cache(
      k=c.k.at[:, slot, :t].set(prefix.k.astype(c.k.dtype), mode="drop"),
      v=c.v.at[:, slot, :t].set(prefix.v.astype(c.v.dtype), mode="drop"),
      key_mask=at_slots(c.key_mask, jnp.arange(c.key_mask.shape[1]) < prefix.length[:, None]),
      end=at_slots(c.end, prefix.length))
  return jax.tree.map(at_slots, slots.replace(cache=None), new.replace(cache=None)).replace(cache=cache)


def decode(model, slots: Slots, left: jax.Array, *, window: int, steps: int) -> tuple[Slots, jax.Array]:
  """Up to `steps` decode steps for every row: each feeds every row its latest token (at position = its
  cache end) and chooses the next. left (B,) int32: the tokens the host still wants from each row (0: a
  free row). A row is active while it has not stopped (an eos id) and the step is below its `left`; the
  loop ends once no row is active. -> the new state and the tokens (N, B), -1 where the row was not
  active, apart from it, so that the host can read them after the next dispatch took (donated) the
  state. Attention reads the cache's first `window` slots only: they must cover every active row's end
  after the last step (other rows decode garbage either way), so a step costs what its longest request
  needs, not what the cache holds."""
  b = slots.token.shape[0]

  def active(i, state):
    return ~state.stopped & (i < left)

  def more(carry):
    i, state, _ = carry
    return (i < steps) & active(i, state).any()

  def step(carry):
    i, state, out = carry
    x = model.language_model.embed_tokens(state.token[:, None])
    h, cache = model.language_model(x, state.cache.end[:, None], jnp.ones((b, 1), bool), state.cache, window=window)
    token = sample(model.lm_head(h[:, 0]), state.seen, state.rows, state.key, state.step)
    on = active(i, state)
    out = out.at[i].set(jnp.where(on, token, -1))
    stopped = state.stopped | (on & (token[:, None] == state.eos).any(-1))
    state = state.replace(cache=cache, token=token, seen=state.seen.at[jnp.arange(b), token].set(True),
                          step=state.step + 1, stopped=stopped)
    return i + 1, state, out

  carry = (jnp.int32(0), slots, jnp.full((steps, b), -1, jnp.int32))
  # One step needs no loop, and runs without one: inside a while loop's body XLA:GPU copies each layer's
  # slice of the stacked MLP kernels before its matmul (tests/inference/test_decode_gpu.py), which the step alone
  # reads where they lie. (Rows that are not active decode garbage in it, as in the loop.)
  _, slots, out = step(carry) if steps == 1 else jax.lax.while_loop(more, step, carry)
  return slots, out


def empty(cfg, *, batch: int, length: int, dtype) -> Slots:
  """`batch` free slots of `length` each (greedy settings, no eos)."""
  return Slots(cache=kv_cache.init(cfg.decoder, batch, length, dtype, per_row=True),
               token=jnp.zeros((batch,), jnp.int32), seen=jnp.zeros((batch, cfg.decoder.vocab_size), bool),
               step=jnp.zeros((batch,), jnp.int32), rows=jax.tree.map(jnp.asarray, Rows.of(*[Sampling()] * batch)),
               key=jax.random.split(jax.random.key(0), batch), eos=jnp.full((batch, EOS_IDS), -1, jnp.int32),
               stopped=jnp.zeros((batch,), bool))


# The engine's programs (`generate_stream` runs `decode_fn` too).


@functools.partial(jax.jit, static_argnames=("graphdef",), compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def prefill_fn(graphdef, params, inputs, length, need, rows, seed, eos) -> tuple[Prefix, jax.Array]:
  """`prefill`; `choose_fn` chooses: the sampler compiled once per P, not into every prompt and audio
  bucket's program."""
  return prefill(nnx.merge(graphdef, params), inputs, length, need, rows, seed, eos)


@jax.jit
def choose_fn(logits, seen, rows, key) -> tuple[jax.Array, jax.Array]:
  return choose(logits, seen, rows, key)


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert_fn(slots: Slots, prefix: Prefix, slot: jax.Array) -> Slots:
  return insert(slots, prefix, slot)


@functools.partial(jax.jit, static_argnames=("graphdef", "window", "steps"), donate_argnames=("slots",),
                   compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def decode_fn(graphdef, params, slots: Slots, left: jax.Array, *, window: int, steps: int) -> tuple[Slots, jax.Array]:
  return decode(nnx.merge(graphdef, params), slots, left, window=window, steps=steps)


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "length", "dtype"))
def empty_fn(cfg, *, batch: int, length: int, dtype) -> Slots:
  return empty(cfg, batch=batch, length=length, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("length",))  # no donation: the old cache cannot hold the new
def grow_fn(slots: Slots, *, length: int) -> Slots:
  """The cache lengthened to `length` slots; the rows keep their contents (the new slots are masked)."""
  c = slots.cache
  wider = lambda x, axis: jnp.pad(x, [(0, length - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])
  cache = c.replace(k=sharding.constrain(wider(c.k, 2), kv_cache.AXES),
                    v=sharding.constrain(wider(c.v, 2), kv_cache.AXES), key_mask=wider(c.key_mask, 1))
  return slots.replace(cache=cache)
