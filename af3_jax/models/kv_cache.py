"""The decoder's key/value cache: an explicit pytree passed into `qwen2.Decoder` and returned updated.

Modules hold no decode state (gemma's `Attention` takes and returns its cache the same way). The stacked
k and v ride through the layer scan as its carry, and each layer writes only its new tokens into them,
so a decode step updates the cache in place instead of rebuilding it. `end` says where each row's new
tokens go (every row holds a sequence of its own length: a prompt of `generate`'s batch, a request in
one of the engine's slots), or nowhere yet: a cache from `init` is empty, so its first tokens (the
prompt) attend only among themselves, which attention kernels take as plain causality (cuDNN's
`is_causal`) rather than a mask; `key_mask` remembers which slots hold real tokens.
Shape letters: L layers, B batch, S cache slots, T new tokens, K kv heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from af3_jax import sharding
from af3_jax.config import DecoderConfig

AXES = ("layers", "batch", "cache_len", "kv_heads", "head_dim")


@struct.dataclass
class Cache:
  """k, v (L, B, S, K, H) in the compute dtype; key_mask (B, S) bool, True where a slot holds a real
  token (False: padding, or not written yet); end (B,) int32, each row's slot for its next token; None
  while the cache is empty (every row's next slot is 0, known when tracing)."""

  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  end: jax.Array


def init(cfg: DecoderConfig, batch: int, max_len: int, dtype, *, per_row: bool = False) -> Cache:
  """An empty cache of `max_len` slots for `batch` rows: `end` None, or with `per_row` zeros (B,), each
  row's own (the engine's slots, which requests are inserted into)."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  zeros = lambda: sharding.constrain(jnp.zeros(shape, dtype), AXES)
  end = jnp.zeros((batch,), jnp.int32) if per_row else None
  return Cache(k=zeros(), v=zeros(), key_mask=jnp.zeros((batch, max_len), bool), end=end)


def write(slots: jax.Array, new: jax.Array, end: jax.Array | None, layer: jax.Array | None = None) -> jax.Array:
  """Puts `new` (B, T, ...) into `slots` (B, S, ...), row b at slots end[b]..end[b]+T-1 (`end` (B,); None:
  0); with `layer`, into that layer of stacked `slots` (L, B, S, ...). Only the new slots are touched."""
  lead = () if layer is None else (layer,)
  new = new.astype(slots.dtype)
  if end is None:  # an empty cache's first tokens: one slice update at slot 0
    start = (*lead, 0, 0) + (0,) * (new.ndim - 2)
    return jax.lax.dynamic_update_slice(slots, new.reshape((1,) * len(lead) + new.shape), start)
  # A scatter; a row whose end has run past S (a free engine slot) writes nothing.
  rows = jnp.arange(new.shape[0])[:, None]
  return slots.at[(*lead, rows, end[:, None] + jnp.arange(new.shape[1]))].set(new, mode="drop")
