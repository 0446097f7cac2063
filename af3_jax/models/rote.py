"""Rotary time embeddings (RoTE): Music Flamingo turns the encoder's output by the time of each frame
before the projector. Mirrors transformers' `MusicFlamingoRotaryEmbedding`, `apply_rotary_time_emb` and
`MusicFlamingoModel._build_audio_timestamps` (models/musicflamingo/modeling_musicflamingo.py).

A pooled frame p of window w of its audio sits at t = (w * P + p) * 4 * mel_frame_seconds (conv2 and the
pool each halve the mel rate: 0.04 s a frame, 30 s a window). Two axes of C = `RoTEConfig.pairs(D)`
frequencies f_c = theta^(-2c / R) each turn adjacent channel pairs (0, 1), (2, 3), ... of the first 4C
channels by angle * (-2 pi t): the window axis with angle (w / theta) f_c, the frame axis with
(p / theta) 2 pi f_c. The window index restarts for each audio: an audio is a run of consecutive audio
tokens in the prompt (upstream's definition; Music Flamingo's bos/eos tokens separate adjacent audios).
Angles are float32 in upstream's order of operations (they reach ~3e4 rad at 20 minutes, where a
reordered product would already move them by a float32 step); the turn itself is float32 too (upstream
float64, a difference far below the compute dtype's).
Shape letters: B batch, T sequence, W windows, P pooled frames per window, D width, C pairs per axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from af3_jax.config import RoTEConfig


def window_indices(is_audio: jax.Array, frames: jax.Array) -> jax.Array:
  """(W,) int32: each window's index within its audio.

  is_audio (B, T) bool marks the audio tokens; frames (W,) int the tokens each window fills, in order
  (row-major over the prompt, as the frames are merged). A window belongs to the audio (run of audio
  tokens) that holds its first token, as upstream's `searchsorted` decides; a window of no tokens goes
  with the next audio, and extra windows past the last token with the last (their frames are unused).
  """
  starts = is_audio & ~jnp.pad(is_audio[:, :-1], ((0, 0), (1, 0)))  # the first token of each run, per row
  seen = jnp.cumsum(is_audio.reshape(-1))  # audio tokens up to each position (non-decreasing)
  run = jnp.cumsum(starts.reshape(-1)) - 1  # the run each audio position is in
  first = jnp.cumsum(frames) - frames  # each window's first token, counted over all audio tokens
  at = jnp.searchsorted(seen, first + 1)  # the position of that token
  audio = run[jnp.minimum(at, run.shape[0] - 1)]  # non-decreasing over the windows
  return (jnp.arange(frames.shape[0]) - jnp.searchsorted(audio, audio, side="left")).astype(jnp.int32)


def timestamps(window_index: jax.Array, frames_per_window: int, cfg: RoTEConfig) -> jax.Array:
  """(W,) window indices -> (W, P) float32 seconds of each pooled frame, as upstream computes them."""
  step = np.float32(cfg.mel_frame_seconds * 4)
  offsets = jnp.arange(frames_per_window, dtype=jnp.float32) * step
  return (window_index * frames_per_window).astype(jnp.float32)[:, None] * step + offsets


def angles(times: jax.Array, window_index: jax.Array, cfg: RoTEConfig, width: int) -> jax.Array:
  """(W, P) seconds and (W,) window indices -> (W, P, 2C) float32 angles: C for the window axis, then C
  for the frame axis.

  What depends only on shapes is computed in numpy on the host: XLA would turn a division by a constant
  into a product with its reciprocal, a float32 step away from upstream. Upstream rounds each window's
  first time back to its index (`round(t / 30 s)`); the index is used as it is, the same number.
  """
  windows, frames = times.shape
  rotary = int(width * cfg.partial_rotary_factor)
  theta = np.float32(cfg.theta)
  exponents = np.arange(0, rotary, 2, dtype=np.float32) / np.float32(rotary)
  # torch's float32 power is all but correctly rounded: float64 then rounding gives its values (numpy's
  # and XLA's float32 powers are a float32 step off for about a tenth of them).
  inv_freq = np.float32(1.0) / (np.float64(cfg.theta) ** exponents.astype(np.float64)).astype(np.float32)
  window_table = (np.arange(windows, dtype=np.float32) / theta)[:, None] * inv_freq  # (W, C)
  frame_table = ((np.arange(frames, dtype=np.float32) / theta * np.float32(2 * math.pi))[:, None] * inv_freq)
  window = jnp.broadcast_to(jnp.asarray(window_table)[window_index][:, None, :], (windows, frames, inv_freq.size))
  frame = jnp.broadcast_to(jnp.asarray(frame_table)[None], window.shape)
  turn = -times * np.float32(2) * np.float32(math.pi)
  return jnp.concatenate([window, frame], axis=-1) * turn[..., None]


def rotate(x: jax.Array, window_index: jax.Array, cfg: RoTEConfig) -> jax.Array:
  """x (W, P, D) encoder output, window_index (W,) -> x with its first 4C channels turned, in x's dtype."""
  theta = angles(timestamps(window_index, x.shape[1], cfg), window_index, cfg, x.shape[-1])
  pairs = theta.shape[-1]
  turned = x[..., :2 * pairs].astype(jnp.float32).reshape(*x.shape[:-1], pairs, 2)
  even, odd = turned[..., 0], turned[..., 1]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  turned = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(*x.shape[:-1], 2 * pairs)
  return jnp.concatenate([turned.astype(x.dtype), x[..., 2 * pairs:]], axis=-1)
