"""Attention in jax's Pallas splash kernel (block-sparse flash attention), for TPUs.

`attention.attention` sends long prompts here when the program runs on a TPU. The kernel never builds
the (T, S) scores: it walks blocks of queries and keys through on-chip memory, skips the blocks its
static mask rules out (causality), and masks the rest elementwise by segment ids: a query sees a key
when their ids are equal. Our masks become that form:
- key_mask, kv_lengths and, when causal, the slots past the new tokens give a key the id -1, which no
  query has (segment ids are >= 0: 0 marks padding, samples count from 1); without segment ids every
  query and every valid key has id 0;
- causality is the kernel's static `CausalMask`, but a cache offset is traced. So the keys are rotated
  by S - T - q_offset: the new tokens end at the last key slot, query i sees rotated key j iff
  j <= S - T + i (a static offset), and the slots past the new tokens, all invalid, wrap to the front;
- grouped-query attention: the kernel's multi-head form takes K kv heads for N query heads (N / K
  queries per kv head) without repeating them.
Lengths are padded at the end to a multiple of their block (512; a shorter length rounds up to 128,
the kernel's lane width): padded keys are invalid and past every real query's causal reach, padded queries
are dropped. Under a mesh each device runs the kernel on its shard (`jax.shard_map`): rows split over
the batch axes, heads over the kv heads' axis, as in `sharding.LOGICAL_RULES`.
With 16-bit inputs, trace at jax's default matmul precision: under a global "highest" (our parity
tests set it) Mosaic is asked for a float32 contraction of bfloat16 operands and refuses to compile.
Shape letters: B batch, T query length, S key length, N heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from af3_jax import sharding

BLOCK = 512  # queries and keys per kernel block (MaxText's default for splash)
LANES = 128  # the kernel's smallest block: the TPU's vector lane count
MIN_QUERIES = LANES  # shorter query runs (a decode step, a short prompt) would be mostly padding


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, key_mask: jax.Array | None = None,
              kv_lengths: jax.Array | None = None, causal: bool = False, q_offset: jax.Array | None = None,
              segment_ids: jax.Array | None = None, interpret: bool = False) -> jax.Array:
  """`attention.attention`'s contract (same arguments, (B, T, N, H) out) in the splash kernel; causal
  needs S >= T. Segment ids must be >= 0. Rows that see no key give finite values, as the XLA paths'.
  `interpret`: run the kernel in Pallas' interpreter (on a CPU, for tests)."""
  b, t, _, _ = q.shape
  s = k.shape[1]
  if causal and s < t:
    raise ValueError(f"causal splash attention needs at least as many keys as queries, got {t} > {s}")
  offset = 0 if q_offset is None else q_offset
  valid = jnp.ones((b, s), bool)
  if key_mask is not None:
    valid &= key_mask
  if kv_lengths is not None:
    valid &= jnp.arange(s) < kv_lengths[:, None]
  if causal:
    valid &= jnp.arange(s) < jnp.reshape(offset + t, (-1, 1))  # slots past the new tokens
  q_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  kv_ids = jnp.where(valid, 0 if segment_ids is None else q_ids, -1)
  if causal and not (q_offset is None and s == t):
    k, v, kv_ids = (_rotate(x, s - t - offset) for x in (k, v, kv_ids))
  run = functools.partial(_kernel, scale=scale, causal=causal, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    kv = sharding.logical_to_spec(("batch", None, "kv_heads", None), k.shape, dict(mesh.shape))
    rows = P(kv[0], None)
    run = jax.shard_map(run, in_specs=(kv, kv, kv, rows, rows), out_specs=kv, check_vma=False)
  return run(q, k, v, q_ids, kv_ids)


def _rotate(x: jax.Array, shift) -> jax.Array:
  """x (B, S, ...) rolled along S by `shift`: an int or a traced () or (B,) (each row its own)."""
  if jnp.ndim(shift) == 0:
    return jnp.roll(x, shift, axis=1)
  return jax.vmap(lambda row, n: jnp.roll(row, n, axis=0))(x, shift)


def _kernel(q, k, v, q_ids, kv_ids, *, scale: float, causal: bool, interpret: bool) -> jax.Array:
  """One device's splash call: q (B, T, N, H), k and v (B, S, K, H) after `attention`'s rotation,
  segment ids (B, T) and (B, S) with -1 on invalid keys."""
  b, t, n, _ = q.shape
  s = k.shape[1]
  bq, bkv = (min(BLOCK, _round_up(length, LANES)) for length in (t, s))
  tp, sp = _round_up(t, bq), _round_up(s, bkv)
  heads_first = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q, k, v = heads_first(q * scale, tp), heads_first(k, sp), heads_first(v, sp)
  q_ids = jnp.pad(q_ids, ((0, 0), (0, tp - t)))
  kv_ids = jnp.pad(kv_ids, ((0, 0), (0, sp - s)), constant_values=-1)
  # Query i sees keys up to i + S - T: the new tokens end at key slot S - 1 (see `attention`).
  mask = splash.CausalMask((tp, sp), offset=s - t) if causal else splash.FullMask((tp, sp))
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                            block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([mask] * n), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
  out = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=splash.SegmentIds(qi, ki)))(q, k, v, q_ids, kv_ids)
  return out.transpose(0, 2, 1, 3)[:, :t]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
