"""`generate` and `generate_stream`: a transformers-style batch (left padded) decoded as transformers'
`generate` decodes it, greedy token for token, through the one generation path (`slots`). The batch's
rows are checked and taken apart as the engine's requests are (`requests.jobs`), prefilled by the
engine's prefill (right padded) and decoded by its decode step and sampler. Both run the start (the
prefill into the decode cache, the first tokens) as one program, then dispatch the engine's decode step
once per token from the host (`_steps`, which says why not in a device loop): `generate_stream` yields
each step's tokens, `generate` looks every `STOP_CHECK` tokens whether every row has stopped.

Rows are padded to a power of two, prompts and audio windows to the engine's buckets (`requests.Shape`)
and the new tokens to a power of two from 64, so most new prompts reuse a compiled program; the
settings, seed, eos and pad ids and max_new_tokens are data and never recompile. Row i samples with the
key of seed + i (`requests.jobs`): it gets the tokens it would get alone with that seed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

from af3_jax.buckets import bucket
from af3_jax.checkpoints.pretrained import Model
from af3_jax.inference import requests, slots
from af3_jax.models import layers


def start(model, inputs, length, need, rows, seed, eos, *, new_len: int) -> slots.Slots:
  """`generate`'s start: `slots.prefill` of the batch (`slots.prefill`'s arguments) into a cache of
  T + new_len slots a row, and the first tokens' `choose`: the decode state of these rows alone."""
  prefix, logits = slots.prefill(model, inputs, length, need, rows, seed, eos, room=new_len)
  token, seen = slots.choose(logits, prefix.seen, prefix.rows, prefix.key)
  return slots.own(prefix.replace(token=token, seen=seen))


@functools.partial(jax.jit, static_argnames=("graphdef", "new_len"), compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def _start_fn(graphdef, params, inputs, length, need, rows, seed, eos, *, new_len: int):
  """`start` as one program: the state and its first tokens (P,), an array of their own (the next decode
  step takes the state's, donated)."""
  state = start(nnx.merge(graphdef, params), inputs, length, need, rows, seed, eos, new_len=new_len)
  return state, state.token


# How many tokens `generate` queues between its looks at whether every row has stopped: each look waits
# for the device; between them the host only queues decode steps, which the device runs back to back.
STOP_CHECK = 16


@dataclasses.dataclass(frozen=True)
class _Batch:
  """One call's batch as the programs take it."""

  args: tuple  # `slots.prefill`'s arguments after the model (numpy, padded to buckets)
  rows: int  # the caller's rows (the first of the padded ones)
  eos: tuple[int, ...]  # every eos id (the device watches the first `slots.EOS_IDS`)
  pad: int
  new_len: int  # the new-token bucket
  window: int  # the cache's slots a row: prompt bucket + new_len

  def left(self, n: int) -> np.ndarray:
    """(P,) int32: n tokens wanted from each of the caller's rows, none from padding rows."""
    return np.where(np.arange(len(self.args[1])) < self.rows, n, 0).astype(np.int32)


def _batch(model: Model, batch: dict, max_new_tokens: int, seed: int, **kwargs) -> _Batch:
  """Both entry points' arguments settled: the model's generation defaults with `kwargs` on top, the
  batch checked and padded (`requests.jobs`, `requests.batch`)."""
  settings = model.generation.resolve(**kwargs)
  jobs = requests.jobs(model, batch, max_new_tokens, seed, settings)
  shape = requests.shape_of(jobs)
  new_len = bucket(max_new_tokens, requests.MIN_BUCKET)
  return _Batch(requests.batch(jobs, shape, requests.filler_id(model.config)), len(jobs), settings.eos_ids,
                settings.pad_id, new_len, shape.prompt + new_len)


def _answers(tokens: np.ndarray, eos, pad: int) -> np.ndarray:
  """(B, N) tokens, -1 past what each row decoded -> transformers' answer: each row up to its first eos,
  `pad` after it, as many columns as the longest row took."""
  decoded = tokens >= 0
  ended = decoded & np.isin(tokens, list(eos))
  live = decoded & (np.cumsum(ended, axis=1) - ended == 0)
  return np.where(live, tokens, pad)[:, :live.sum(1).max()].astype(np.int32)


def generate(model: Model, batch: dict, max_new_tokens: int, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, seed: int = 0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None) -> np.ndarray:
  """New tokens (batch, n), n <= max_new_tokens the steps taken; rows are `pad_token_id` after their eos.

  batch: transformers' names, `input_ids` (batch, seq) with `attention_mask` (left padding) and, with
  audio, `input_features`, `input_features_mask` and optionally `audio_embed_mask`. Settings left None
  come from the model's generation defaults (its `generation_config.json`, read at load), as in
  transformers. One compile per bucket of shapes; the settings, seed, eos, pad and max_new_tokens
  within a bucket do not recompile.
  """
  b = _batch(model, batch, max_new_tokens, seed, do_sample=do_sample, temperature=temperature, top_k=top_k,
             top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
             pad_token_id=pad_token_id)
  tokens = []
  for i, (token, state) in enumerate(_steps(model, b, max_new_tokens)):
    tokens.append(token)
    if i % STOP_CHECK == STOP_CHECK - 1 and np.asarray(state.stopped)[:b.rows].all():
      break
  tokens = np.stack([np.asarray(t).reshape(-1) for t in jax.device_get(tokens)])  # (N, P), -1: stopped
  return _answers(tokens[:, :b.rows].T, b.eos, b.pad)


def generate_stream(model: Model, batch: dict, max_new_tokens: int, seed: int = 0, **kwargs) -> Iterator[np.ndarray]:
  """Yields each step's new tokens (batch,) as they come, until every row is done or max_new_tokens.

  Takes `generate`'s arguments and yields, step by step, the columns `generate` returns: `start` in one
  program, then the engine's decode step (`slots.decode_fn`), one dispatch a token.
  """
  b = _batch(model, batch, max_new_tokens, seed, **kwargs)
  done = np.zeros(b.rows, bool)
  for token, _ in _steps(model, b, max_new_tokens):
    # On the host: indexing the device array would be a program of its own.
    token = np.where(done, b.pad, np.asarray(token).reshape(-1)[:b.rows])
    done |= np.isin(token, b.eos)
    yield token
    if done.all():
      return


def _steps(model: Model, b: _Batch, max_new_tokens: int) -> Iterator[tuple[jax.Array, slots.Slots]]:
  """Each token's step, dispatched when the next item is asked for and never waited on: `start` in one
  program, then the engine's decode step (`slots.decode_fn`) once per token. Yields the step's tokens on
  the device ((P,) or (1, P); -1 for a row that had stopped) and the state after it.

  The token loop runs on the host, not in a `lax.while_loop`: inside a loop body XLA:GPU copies each
  layer's slice of the stacked MLP kernels before the matmul reads it, every step (the decode step alone
  reads them in place; tests/inference/test_decode_gpu.py compiles both for an H200). The host only
  queues steps, so the device runs them back to back.
  """
  graphdef, params, left = model.graphdef, model.state, b.left(1)
  with jax.set_mesh(model.mesh):
    state, first = _start_fn(graphdef, params, *b.args, new_len=b.new_len)
  yield first, state
  for _ in range(1, max_new_tokens):
    with jax.set_mesh(model.mesh):
      state, out = slots.decode_fn(graphdef, params, state, left, window=b.window, steps=1)
    yield out, state
