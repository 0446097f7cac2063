"""Generation with a KV cache: greedy output token for token what transformers' `generate` gives.

`generate` runs the audio encoder, the prefill and the whole token loop (`lax.while_loop`) in one
jitted function of the model state. `generate_stream` jits the prefill and a single step (which donates
its state, cache included) and yields every step's tokens. Rows and the number of new tokens are padded
to power-of-two buckets, prompt length (left padded) and audio windows to finer ones
(`buckets.prompt_bucket`, `buckets.window_bucket`), so most new prompts reuse a compiled program. The next token is chosen as transformers' processors do, in their order: repetition
penalty, then, when sampling, temperature, top-k and top-p. Samples come from `jax.random` (seeded,
reproducible), so they are not torch's samples.
Shape letters: B batch, T prompt length, G new-token slots, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from af3_jax.buckets import bucket, prompt_bucket, window_bucket
from af3_jax.checkpoints.pretrained import Model, check_inputs
from af3_jax.generation import Sampling
from af3_jax.models import kv_cache, layers
from af3_jax.models.af3 import AudioFlamingo3

TRACES: collections.Counter[str] = collections.Counter()  # traces of each jitted function, for recompile tests
MIN_BUCKET = 64  # the smallest prompt-length and new-token bucket
AUDIO_INPUTS = ("input_features", "input_features_mask", "audio_embed_mask")


def process_logits(logits: jax.Array, seen: jax.Array, s: Sampling) -> jax.Array:
  """(B, V) float32 logits -> the scores transformers' processors give; seen (B, V) bool marks the
  tokens in the prompt (padding excluded) and the output so far."""
  if s.repetition_penalty != 1.0:
    logits = penalize(logits, seen, s.repetition_penalty)
  if not s.do_sample:
    return logits
  if s.temperature != 1.0:  # TemperatureLogitsWarper
    logits = logits / s.temperature
  if s.top_k:  # TopKLogitsWarper: ties with the k-th score stay
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    logits = jnp.where(logits < nucleus_cutoff(jnp.sort(logits, axis=-1), 1 - s.top_p), -jnp.inf, logits)
  return logits


def penalize(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
  """RepetitionPenaltyLogitsProcessor on (B, V) logits; `penalty` a number or (B, 1) (1 changes nothing)."""
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def nucleus_cutoff(ascending: jax.Array, tail) -> jax.Array:
  """TopPLogitsWarper's threshold (B, 1) from each row's scores sorted ascending (B, V): scores below it
  are dropped, the low tail holding at most `tail` = 1 - top_p of the mass (a number or (B, 1)); the top
  one stays."""
  drop = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= tail
  drop = drop.at[:, -1].set(False)
  # `drop` is a prefix of the ascending order, so a threshold finds it without a scatter (an exact tie
  # straddling the cut is kept whole, where torch's sort order would split it).
  return jnp.take_along_axis(ascending, drop.sum(-1, keepdims=True), axis=-1)


@struct.dataclass
class State:
  """Decoding state: cache; token (B,) int32, the latest choice; position (B,) of the last token in the
  cache; done (B,) bool; seen (B, V) bool (repetition penalty); step () tokens chosen; key for sampling;
  eos (E,) and pad () token ids."""

  cache: kv_cache.Cache
  token: jax.Array
  position: jax.Array
  done: jax.Array
  seen: jax.Array
  step: jax.Array
  key: jax.Array
  eos: jax.Array
  pad: jax.Array


def _choose(state: State, logits: jax.Array, s: Sampling) -> State:
  """Picks every row's next token from (B, V) logits; finished rows get `pad`, as in transformers."""
  scores = process_logits(logits.astype(jnp.float32), state.seen, s)
  if s.do_sample:
    token = jax.random.categorical(jax.random.fold_in(state.key, state.step), scores, axis=-1)
  else:
    token = jnp.argmax(scores, axis=-1)
  token = jnp.where(state.done, state.pad, token).astype(jnp.int32)
  return state.replace(token=token, seen=state.seen.at[jnp.arange(token.shape[0]), token].set(True),
                       done=state.done | jnp.isin(token, state.eos), step=state.step + 1)


def prefill(model: AudioFlamingo3, batch: dict[str, jax.Array], new_len: int, s: Sampling, key: jax.Array,
            eos: jax.Array, pad: jax.Array) -> State:
  """Encodes the audio, writes the left-padded prompt (B, T) into a cache of T + new_len slots and
  chooses the first token. Positions are cumsum(attention_mask) - 1, as transformers derives them."""
  ids, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
  x = model.embed(ids, mask, **{k: batch[k] for k in AUDIO_INPUTS if k in batch})
  b, t = ids.shape
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
  cache = kv_cache.init(model.cfg.decoder, b, t + new_len, x.dtype)
  h, cache = model.language_model(x, positions, mask, cache)
  vocab = model.cfg.decoder.vocab_size
  # Padding points at an extra column that is dropped (transformers' RepetitionPenaltyLogitsProcessor).
  seen = jnp.zeros((b, vocab + 1), bool).at[jnp.arange(b)[:, None], jnp.where(mask, ids, vocab)].set(True)
  state = State(cache=cache, token=jnp.zeros((b,), jnp.int32), position=positions[:, -1], done=~mask[:, -1],
                seen=seen[:, :vocab], step=jnp.zeros((), jnp.int32), key=key, eos=eos, pad=pad)
  return _choose(state, model.lm_head(h[:, -1]), s)


def step(model: AudioFlamingo3, state: State, s: Sampling) -> State:
  """Feeds every row's latest token (finished rows too, as transformers does) and chooses the next."""
  position = state.position + 1
  x = model.language_model.embed_tokens(state.token[:, None])
  h, cache = model.language_model(x, position[:, None], jnp.ones((x.shape[0], 1), bool), state.cache)
  return _choose(state.replace(cache=cache, position=position), model.lm_head(h[:, 0]), s)


@functools.partial(jax.jit, static_argnames=("graphdef", "s", "new_len"),
                   compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def _generate_fn(graphdef, params, batch, max_new_tokens, key, eos, pad, *, s: Sampling, new_len: int):
  """-> tokens (B, G) and the number of steps taken."""
  TRACES["generate"] += 1
  model = nnx.merge(graphdef, params)
  state = prefill(model, batch, new_len, s, key, eos, pad)
  tokens = jnp.full((state.token.shape[0], new_len), state.pad, jnp.int32).at[:, 0].set(state.token)

  def more(carry):
    state, _ = carry
    return (state.step < max_new_tokens) & ~state.done.all()

  def next_token(carry):
    state, tokens = carry
    state = step(model, state, s)
    return state, jax.lax.dynamic_update_slice_in_dim(tokens, state.token[:, None], state.step - 1, axis=1)

  state, tokens = jax.lax.while_loop(more, next_token, (state, tokens))
  return tokens, state.step


@functools.partial(jax.jit, static_argnames=("graphdef", "s", "new_len"),
                   compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def _prefill_fn(graphdef, params, batch, key, eos, pad, *, s: Sampling, new_len: int) -> State:
  TRACES["prefill"] += 1
  return prefill(nnx.merge(graphdef, params), batch, new_len, s, key, eos, pad)


@functools.partial(jax.jit, static_argnames=("graphdef", "s"), donate_argnames="state",
                   compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def _step_fn(graphdef, params, state: State, *, s: Sampling) -> State:
  TRACES["step"] += 1
  return step(nnx.merge(graphdef, params), state, s)


def _pad_to(x: np.ndarray, shape: tuple[int, ...], value: int = 0) -> np.ndarray:
  """Pads with `value` the leading axis at the end and the second axis at the front (left padding)."""
  widths = [(0, shape[0] - x.shape[0])] + [(shape[1] - x.shape[1], 0)] * (x.ndim > 1) + [(0, 0)] * (x.ndim - 2)
  return np.pad(x, widths, constant_values=value)


def _pad_batch(model: Model, batch: dict, pad_id: int) -> dict[str, np.ndarray]:
  """Checks a transformers-named batch and pads it to buckets: extra rows are all padding (finished
  from the start), prompts are left padded with `pad_id` (the mask, not the id, makes a position
  padding: it is never audio), extra audio windows are empty (they give no frames)."""
  batch = {k: np.asarray(v) for k, v in batch.items() if v is not None}
  unknown = set(batch) - {"input_ids", "attention_mask", *AUDIO_INPUTS}
  if unknown:
    raise ValueError(f"unknown batch entries {sorted(unknown)}")
  check_inputs(model.config, **batch)
  ids = batch["input_ids"]
  mask = batch.setdefault("attention_mask", np.ones_like(ids))
  if not (np.isin(mask, (0, 1)).all() and (np.diff(mask, axis=1) >= 0).all() and mask[:, -1].all()):
    raise ValueError("attention_mask must be left padding (zeros, then ones) with a token in every row")
  rows, length = bucket(ids.shape[0]), prompt_bucket(ids.shape[1], MIN_BUCKET)
  out = {"input_ids": _pad_to(ids, (rows, length), pad_id), "attention_mask": _pad_to(mask, (rows, length))}
  if "input_features" in batch:
    windows = window_bucket(len(batch["input_features"]))
    out.update({k: _pad_to(batch[k], (windows,) + batch[k].shape[1:]) for k in AUDIO_INPUTS if k in batch})
  return out


def generate(model: Model, batch: dict, max_new_tokens: int, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, seed: int = 0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None) -> np.ndarray:
  """New tokens (batch, n), n <= max_new_tokens the steps taken; rows are `pad_token_id` after their eos.

  batch: transformers' names, `input_ids` (batch, seq) with `attention_mask` (left padding) and, with
  audio, `input_features`, `input_features_mask` and optionally `audio_embed_mask`. Settings left None
  come from the model's generation defaults (its `generation_config.json`, read at load), as in
  transformers. One compile per bucket of shapes and per `Sampling`; seed, eos, pad and max_new_tokens
  within a bucket do not recompile.
  """
  r = _request(model, batch, max_new_tokens, seed, do_sample=do_sample, temperature=temperature, top_k=top_k,
               top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
               pad_token_id=pad_token_id)
  with jax.set_mesh(model.mesh):
    tokens, n = _generate_fn(model.graphdef, model.state, r.inputs, max_new_tokens, r.key, r.eos, r.pad,
                             s=r.sampling, new_len=r.new_len)
  return np.asarray(tokens)[:len(batch["input_ids"]), :int(n)]


def generate_stream(model: Model, batch: dict, max_new_tokens: int, seed: int = 0, **kwargs) -> Iterator[np.ndarray]:
  """Yields each step's new tokens (batch,) as they come, until every row is done or max_new_tokens.

  Takes `generate`'s arguments and yields, step by step, the columns `generate` returns.
  """
  r = _request(model, batch, max_new_tokens, seed, **kwargs)
  state = None
  for _ in range(max_new_tokens):
    with jax.set_mesh(model.mesh):
      if state is None:
        state = _prefill_fn(model.graphdef, model.state, r.inputs, r.key, r.eos, r.pad, s=r.sampling,
                            new_len=r.new_len)
      else:
        state = _step_fn(model.graphdef, model.state, state, s=r.sampling)
    token, done = jax.device_get((state.token, state.done))
    yield token[:len(batch["input_ids"])]
    if done.all():
      return


@dataclasses.dataclass(frozen=True)
class _Request:
  """One call's inputs as the jitted functions take them."""

  sampling: Sampling
  inputs: dict[str, np.ndarray]  # padded to buckets
  key: jax.Array
  eos: np.ndarray  # (E,) int32, -1 past the real ids
  pad: np.int32
  new_len: int  # the new-token bucket


def _request(model: Model, batch: dict, max_new_tokens: int, seed: int, **kwargs) -> _Request:
  """Settles both entry points' arguments: the model's generation defaults with `kwargs` on top."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  settings = model.generation.resolve(**kwargs)
  eos = np.full(bucket(len(settings.eos_ids), 4), -1, np.int32)  # -1 is never a token; the bucket spares recompiles
  eos[:len(settings.eos_ids)] = settings.eos_ids
  return _Request(settings.sampling, _pad_batch(model, batch, settings.pad_id), jax.random.key(seed), eos,
                  np.int32(settings.pad_id), bucket(max_new_tokens, MIN_BUCKET))
