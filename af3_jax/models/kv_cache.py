"""The decoder's key/value cache: an explicit pytree passed into `qwen2.Decoder` and returned updated.

Modules hold no decode state (gemma's `Attention` takes and returns its cache the same way). Every row
of the batch writes the same slots: prompts are left padded to one length, so slot `end` is the next
token of every row, and `key_mask` remembers which slots hold padding.
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
  token (False: left padding, or not written yet); end () int32, the number of slots written."""

  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  end: jax.Array


def init(cfg: DecoderConfig, batch: int, max_len: int, dtype) -> Cache:
  """An empty cache of `max_len` slots for `batch` rows."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  zeros = lambda: sharding.constrain(jnp.zeros(shape, dtype), AXES)
  return Cache(k=zeros(), v=zeros(), key_mask=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32))


def write(slots: jax.Array, new: jax.Array, end: jax.Array) -> jax.Array:
  """Puts `new` (B, T, ...) into `slots` (B, S, ...) at slots end..end+T-1."""
  return jax.lax.dynamic_update_slice_in_dim(slots, new.astype(slots.dtype), end, axis=1)

