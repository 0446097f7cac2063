"""Softmax attention, on the backend of the devices it runs on.

`attention` is the one entry point for the encoder's and the decoder's attention. The backend follows
the platform of the mesh the program is traced for (`targets.platform`), not the host's default
backend, so a deviceless compile for a GPU or TPU takes that accelerator's path.
Shape letters: B batch, T query length, S key length, N heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from af3_jax import targets
from af3_jax.models import splash

# Up to this many attention scores (B N T S), 64 MiB in float32, XLA computes them in one piece: the
# tiny test models' prompts and decode steps, which compile faster so. Beyond it, blockwise: memory linear
# in the prompt. The full decoder passes it at ~740 prompt tokens; 15,000 would be 6.3e9 scores (25 GB).
DENSE_MAX_SCORES = 2**24
# The blockwise path's tile: Q_BLOCK rows of scores (Q_BLOCK // G queries, each with the G heads of a kv
# head) by KV_CHUNK keys, 8 MiB of float32 scores a kv head.
Q_BLOCK = 512
KV_CHUNK = 1024


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, key_mask: jax.Array | None = None,
              kv_lengths: jax.Array | None = None, causal: bool = False, q_offset: jax.Array | None = None,
              segment_ids: jax.Array | None = None) -> jax.Array:
  """Softmax attention over (B, T, N, H) queries and (B, S, K, H) keys/values (K divides N: GQA).

  Keys a query may see: those with `key_mask` (B, S) bool True, below `kv_lengths` (B,), if
  `causal` at or before the query's own slot, q_offset + i for query i (q_offset int, () or (B,) for
  rows that each start elsewhere; default 0), and, given `segment_ids` (B, T) int for queries and
  keys alike (no cache: T == S), those of the query's own segment (packed rows hold several samples).
  `kv_lengths` states right padding: in causal attention without `q_offset`, queries at or past a row's
  length are padding too, and their output is unspecified (cuDNN skips them and gives zeros).
  Backends: cuDNN flash attention on GPU for 16-bit inputs (`_cudnn`; it rejects float32); XLA in one
  piece when there are at most `DENSE_MAX_SCORES` scores; otherwise blockwise (`_blockwise`), so no
  (T, S) array is ever built for a long prompt.
  On TPU, runs of at least `splash.MIN_QUERIES` queries go to the Pallas splash kernel (`splash`);
  decode steps and short prompts stay on XLA, as a kernel block would be mostly padding.
  """
  b, t, n, _ = q.shape
  s = k.shape[1]
  if targets.platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    # Causality from slot 0 is cuDNN's own flag; after a cache it is part of the mask.
    offset_causal = causal and q_offset is not None
    return _cudnn(q, k, v, scale=scale, mask=_Mask(key_mask, None, offset_causal, q_offset, segment_ids),
                  kv_lengths=kv_lengths, causal=causal and not offset_causal)
  if targets.platform() == "tpu" and t >= splash.MIN_QUERIES and (s >= t or not causal):
    return splash.attention(q, k, v, scale=scale, key_mask=key_mask, kv_lengths=kv_lengths, causal=causal,
                            q_offset=q_offset, segment_ids=segment_ids)
  mask = _Mask(key_mask, kv_lengths, causal, q_offset, segment_ids)
  if b * n * t * s <= DENSE_MAX_SCORES:
    return jax.nn.dot_product_attention(q, k, v, mask=mask(0, t, s), scale=scale, implementation="xla")
  return _blockwise(q, k, v, scale=scale, mask=mask)


def _cudnn(q, k, v, *, scale, mask: _Mask, kv_lengths: jax.Array | None, causal: bool) -> jax.Array:
  """`attention` as cuDNN's flash attention (`jax.nn.dot_product_attention`), GQA as it is (no repeated
  kv heads). What cuDNN takes as its own arguments goes there: causality from slot 0 (`is_causal`, its
  top-left diagonal, so it skips the blocks above it) and right padding as sequence lengths. Anything
  else in `mask` (a key mask such as left padding, segments of packed rows, causality after a cache)
  goes in as a full (B, 1, T, S) mask, the one shape jax's cuDNN path takes (a (B, 1, 1, S) key mask
  fails its layout check); jax turns it into an additive bias of that size in the compute dtype (and
  training computes its gradient too): 128 MiB a row of 8,192 tokens in bfloat16.
  jax.nn has no segment ids for cuDNN: only its private packed layout (q/kv offsets) has them.
  """
  b, t, _, _ = q.shape
  s = k.shape[1]
  m = mask(0, t, s)
  q_lengths = None
  if kv_lengths is not None:
    # In causal attention (T == S), the queries past a row's length are its right padding.
    q_lengths = kv_lengths.astype(jnp.int32) if causal and t == s else None
    # A query with no key at all (an empty audio window that pads a bucket, dropped later) has no
    # defined output in cuDNN's padding mask: give it one key, so that it stays finite.
    kv_lengths = jnp.maximum(kv_lengths, 1).astype(jnp.int32)
  return jax.nn.dot_product_attention(
      q, k, v, mask=None if m is None else jnp.broadcast_to(m, (b, 1, t, s)), scale=scale, is_causal=causal,
      query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths, implementation="cudnn")


@dataclasses.dataclass(frozen=True)
class _Mask:
  """The keys each query may see (see `attention`), built for one block of queries at a time."""

  key_mask: jax.Array | None
  kv_lengths: jax.Array | None
  causal: bool
  q_offset: jax.Array | None
  segment_ids: jax.Array | None

  def __call__(self, start, t: int, s: int) -> jax.Array | None:
    """(B or 1, 1, t, S) bool for queries start..start+t-1, or None: every key."""
    parts = []
    if self.key_mask is not None:
      parts.append(self.key_mask[:, None, None, :])
    if self.kv_lengths is not None:
      parts.append((jnp.arange(s) < self.kv_lengths[:, None])[:, None, None, :])
    if self.causal:
      slots = start + jnp.arange(t) + (0 if self.q_offset is None else self.q_offset[..., None])  # (t,) or (B, t)
      parts.append((jnp.arange(s) <= slots[..., None]).reshape(-1, 1, t, s))
    if self.segment_ids is not None:
      queries = jax.lax.dynamic_slice_in_dim(self.segment_ids, start, t, axis=1)
      parts.append(queries[:, None, :, None] == self.segment_ids[:, None, None, :])
    return functools.reduce(jnp.logical_and, parts) if parts else None


def _blockwise(q, k, v, *, scale, mask: _Mask) -> jax.Array:
  """`attention` in blocks of queries, each an online softmax over its keys (`_online_softmax`).
  Temporaries are linear in S: the mask of one block of queries, (B, 1, Q, S) bool.

  The G query heads that share a kv head are G rows of a block, so k and v are never repeated to N heads
  for GQA. The last block overlaps the one before it when the block does not divide T, so nothing is
  padded.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  rows = min(max(Q_BLOCK // (n // kh), 1), t)  # queries per block

  def block(i, out):
    start = jnp.minimum(i * rows, t - rows)
    qb = jax.lax.dynamic_slice_in_dim(q, start, rows, axis=1).reshape(b, rows, kh, n // kh, h)
    o = _online_softmax(qb, k, v, mask(start, rows, s), scale)
    return jax.lax.dynamic_update_slice_in_dim(out, o.reshape(b, rows, n, h), start, axis=1)

  return jax.lax.fori_loop(0, -(-t // rows), block, jnp.zeros_like(q))


def _online_softmax(q, k, v, mask: jax.Array | None, scale: float) -> jax.Array:
  """softmax(scale q k) v for (B, Q, K, G, H) queries (G heads a kv head) and (B, S, K, H) keys/values,
  `mask` (B or 1, 1, Q, S) or None, over `KV_CHUNK` keys at a time: each query carries its running
  maximum score, the sum of its weights and its weighted values (flash attention's recurrence, in XLA),
  so no (Q, S) scores exist at once. Scores and sums are float32; a chunk is recomputed in the backward
  pass (remat), which then stores only the carries. A masked key scores float32's lowest, not -inf, as
  XLA's one-piece path does: a query that sees no key at all averages every value instead of a NaN.
  """
  b, rows, kh, g, h = q.shape
  s = k.shape[1]
  lowest = jnp.finfo(jnp.float32).min

  def chunk(carry, start, *, size):
    acc, top, total = carry
    kc, vc = (jax.lax.dynamic_slice_in_dim(x, start, size, axis=1) for x in (k, v))
    x = jnp.einsum("bqkgh,bskh->bkgqs", q, kc, preferred_element_type=jnp.float32) * scale
    if mask is not None:
      x = jnp.where(jax.lax.dynamic_slice_in_dim(mask, start, size, axis=3)[:, :, None], x, lowest)
    new_top = jnp.maximum(top, x.max(-1))
    weights = jnp.exp(x - new_top[..., None])
    decay = jnp.exp(top - new_top)
    acc = acc * decay[..., None] + jnp.einsum("bkgqs,bskh->bkgqh", weights, vc, preferred_element_type=jnp.float32)
    return acc, new_top, total * decay + weights.sum(-1)

  carry = (jnp.zeros((b, kh, g, rows, h), jnp.float32), jnp.full((b, kh, g, rows), -jnp.inf),
           jnp.zeros((b, kh, g, rows)))
  step = lambda size: jax.remat(functools.partial(chunk, size=size), prevent_cse=False)
  full, rest = divmod(s, KV_CHUNK)
  if full:  # (a loop of no steps is still traced, and a chunk longer than the keys does not slice)
    carry = jax.lax.fori_loop(0, full, lambda i, c: step(KV_CHUNK)(c, i * KV_CHUNK), carry)
  if rest:  # the keys past the last whole chunk
    carry = step(rest)(carry, full * KV_CHUNK)
  acc, _, total = carry
  return (acc / total[..., None]).transpose(0, 3, 1, 2, 4).astype(q.dtype)
