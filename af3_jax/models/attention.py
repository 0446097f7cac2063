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
Q_BLOCK = 512  # queries per block of the blockwise path


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, key_mask: jax.Array | None = None,
              kv_lengths: jax.Array | None = None, causal: bool = False, q_offset: jax.Array | None = None,
              segment_ids: jax.Array | None = None) -> jax.Array:
  """Softmax attention over (B, T, N, H) queries and (B, S, K, H) keys/values (K divides N: GQA).

  Keys a query may see: those with `key_mask` (B, S) bool True, below `kv_lengths` (B,), if
  `causal` at or before the query's own slot, q_offset + i for query i (q_offset int, () or (B,) for
  rows that each start elsewhere; default 0), and, given `segment_ids` (B, T) int for queries and
  keys alike (no cache: T == S), those of the query's own segment (packed rows hold several samples).
  Backends: cuDNN flash attention on GPU for 16-bit inputs (it rejects float32); XLA in one piece
  when there are at most `DENSE_MAX_SCORES` scores; otherwise blockwise (`_blockwise`), so no (T, S)
  array is ever built for a long prompt.
  On TPU, runs of at least `splash.MIN_QUERIES` queries go to the Pallas splash kernel (`splash`);
  decode steps and short prompts stay on XLA, as a kernel block would be mostly padding.
  """
  b, t, n, _ = q.shape
  s = k.shape[1]
  if targets.platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    # cuDNN takes causality as a flag when queries and keys start together, as a mask after a cache.
    # jax.nn has no segment ids for it (only its private packed layout does), so segments come as a
    # (B, 1, T, S) mask, which it turns into a bias: 128 MiB a row of 8192 tokens in bfloat16.
    offset_causal = causal and q_offset is not None
    return jax.nn.dot_product_attention(
        q, k, v, mask=_Mask(key_mask, None, offset_causal, q_offset, segment_ids)(0, t, s), scale=scale,
        is_causal=causal and not offset_causal,
        key_value_seq_lengths=None if kv_lengths is None else kv_lengths.astype(jnp.int32),
        implementation="cudnn")
  if targets.platform() == "tpu" and t >= splash.MIN_QUERIES and (s >= t or not causal):
    return splash.attention(q, k, v, scale=scale, key_mask=key_mask, kv_lengths=kv_lengths, causal=causal,
                            q_offset=q_offset, segment_ids=segment_ids)
  mask = _Mask(key_mask, kv_lengths, causal, q_offset, segment_ids)
  if b * n * t * s <= DENSE_MAX_SCORES:
    return jax.nn.dot_product_attention(q, k, v, mask=mask(0, t, s), scale=scale, implementation="xla")
  return _blockwise(q, k, v, scale=scale, mask=mask)


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
  """`attention` in blocks of `Q_BLOCK` queries, each through tokamax's `xla_chunked` (online softmax
  over 1024-key chunks). Temporaries are linear in S: the mask of one block of queries, (B, 1, Q, S) bool.

  Two things tokamax would otherwise do for us cost memory: it turns any mask into a dense (T, S) array
  (hence our query blocks), and it repeats k and v to N heads for GQA (hence the G queries sharing a kv
  head become G rows of one block). The last block overlaps the one before it when Q_BLOCK does not
  divide T, so nothing is padded. Segments of packed rows are part of each block's mask: tokamax's own
  `Mask` can state contiguous segments as per-query key ranges, but its public API takes a boolean mask.
  """
  # tokamax is imported here, not at the top: GPU runs in 16-bit never need it.
  import tokamax
  from absl import flags

  # tokamax 0.0.12 parses sys.argv with absl on first use and fails on the host program's own arguments
  # (pytest's, a script's; openxla/tokamax#957). Where absl has not parsed them (no app.run), its flags
  # keep their defaults: parsing here would also run the validators of flags the host defined (train.py's
  # required ones, once imported).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

  b, t, n, h = q.shape
  kh = k.shape[2]
  g, rows = n // kh, min(Q_BLOCK, t)

  def block(i, out):
    start = jnp.minimum(i * rows, t - rows)
    qb = jax.lax.dynamic_slice_in_dim(q, start, rows, axis=1)
    qb = qb.reshape(b, rows, kh, g, h).transpose(0, 1, 3, 2, 4).reshape(b, rows * g, kh, h)
    m = mask(start, rows, k.shape[1])
    m = None if m is None else jnp.repeat(m, g, axis=2)
    o = tokamax.dot_product_attention(qb, k, v, mask=m, scale=scale, implementation="xla_chunked")
    o = o.reshape(b, rows, g, kh, h).transpose(0, 1, 3, 2, 4).reshape(b, rows, n, h)
    return jax.lax.dynamic_update_slice_in_dim(out, o, start, axis=1)

  return jax.lax.fori_loop(0, -(-t // rows), block, jnp.zeros_like(q))
