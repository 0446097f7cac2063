"""Attention's masks built directly (the reference `attention` is checked against) and random cases."""

import jax.numpy as jnp
import numpy as np


def segment_ids(b, t, lengths) -> np.ndarray:
  """(B, T) int: row i holds samples of `lengths[i]` tokens, numbered from 1, then padding (0)."""
  ids = np.zeros((b, t), np.int32)
  for i, row in enumerate(lengths):
    ids[i, :sum(row)] = np.repeat(np.arange(1, len(row) + 1), row)
  return ids


def reference_mask(b, t, s, *, causal, offset, pads=None, lengths=None, segments=None) -> np.ndarray:
  """(B, 1, T, S) bool built directly: left padding, written cache slots, causality, key lengths,
  packed samples (each sees only itself; padding sees nothing)."""
  key = np.ones((b, s), bool)
  if pads is not None:
    key &= np.arange(s)[None] >= np.array(pads)[:, None]
  if offset is not None:
    key &= np.arange(s)[None] < offset + t  # slots past the new tokens are not written yet
  if lengths is not None:
    key &= np.arange(s)[None] < np.array(lengths)[:, None]
  mask = np.broadcast_to(key[:, None, None, :], (b, 1, t, s))
  if causal:
    mask = mask & (np.arange(s)[None, :] <= (offset or 0) + np.arange(t)[:, None])
  if segments is not None:
    ids = segment_ids(b, t, segments)
    mask = mask & (ids[:, None, :, None] == ids[:, None, None, :]) & (ids[:, None, :, None] > 0)
  return mask


def case_inputs(case: dict, seed: int = 0):
  """q, k, v of `case` (float32, unit normal), `attention`'s keyword arguments for its masks, and the
  (B, 1, T, S) reference mask. `offset` is one slot for every row, or one per row."""
  b, t, s, n, k, h = case["shape"]
  rng = np.random.default_rng(seed)
  q, key, value = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                   for shape in [(b, t, n, h), (b, s, k, h), (b, s, k, h)])
  offset = case["offset"]
  row = lambda name, i: None if name not in case else (case[name][i],)
  mask = np.concatenate([
      reference_mask(1, t, s, causal=case["causal"], offset=None if offset is None else np.broadcast_to(offset, b)[i],
                     pads=row("pads", i), lengths=row("lengths", i), segments=row("segments", i))
      for i in range(b)])
  kw = dict(scale=h**-0.5, causal=case["causal"])
  if "lengths" in case:
    kw["kv_lengths"] = jnp.array(case["lengths"])
  elif "segments" in case:
    kw["segment_ids"] = jnp.asarray(segment_ids(b, t, case["segments"]))
    kw["key_mask"] = kw["segment_ids"] > 0
  else:
    kw["key_mask"] = jnp.asarray(mask[:, 0, -1])  # the last query sees every key a row has
  if offset is not None:
    kw["q_offset"] = jnp.asarray(offset, jnp.int32)
  return (q, key, value), kw, mask
