"""Qwen2 decoder: mirrors transformers' `Qwen2Model` (the LM head lives in `af3.py`).

RMSNorm, default RoPE (rotate-half pairing), grouped-query attention with q/k/v biases, SwiGLU MLP.
Shape letters: B batch, T query length, S key length, D width, N heads, K kv heads, H head dim, F mlp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from af3_jax.config import DecoderConfig
from af3_jax import sharding
from af3_jax.models import kv_cache, layers

ACTIVATION_AXES = ("batch", "length", None)
KV = tuple[jax.Array, jax.Array]  # one layer's cached keys and values, (B, S, K, H) each


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding on (B, T, N, H) at integer positions (B, T), computed in float32.

  HF's `rotate_half` pairs dimension i with i + H/2 (not interleaved pairs).
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """`Qwen2Attention`: causal GQA; q/k/v have biases, o_proj has none."""

  def __init__(self, cfg: DecoderConfig, *, compute_dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.q_proj = layers.Linear(d, n * h, use_bias=True, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Linear(d, k * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
    self.v_proj = layers.Linear(d, k * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
    self.o_proj = layers.Linear(n * h, d, use_bias=False, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array, kv: KV | None = None,
               end: jax.Array | None = None, segment_ids: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
    """x (B, T, D); positions (B, T) int; key_mask (B, S) bool: the keys that are real tokens.

    Without `kv` the keys are the T tokens themselves (S = T). With `kv` = (k, v), this layer's cache
    (B, S, K, H) each, the new keys and values are written at slots end..end+T-1 first and the queries
    attend over all S slots. Causal either way. `segment_ids` (B, T) int (no cache): a token attends
    only within its own segment, a sample of a packed row. Returns the output (B, T, D) and the updated `kv`.
    """
    b, t, _ = x.shape
    cfg = self.cfg
    q = rope(self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
    k = rope(self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if kv is not None:
      k, v = kv_cache.write(kv[0], k, end), kv_cache.write(kv[1], v, end)
      kv = (k, v)
    # With a cache, new token i sits at slot end + i; the slots after it are empty or in its future.
    o = layers.attention(q, k, v, scale=cfg.head_dim**-0.5, key_mask=key_mask, causal=True,
                         q_offset=None if kv is None else end, segment_ids=segment_ids)
    return self.o_proj(o.reshape(b, t, -1)), kv


class MLP(nnx.Module):
  """`Qwen2MLP`: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: DecoderConfig, *, compute_dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = layers.Linear(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = layers.Linear(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = layers.Linear(f, d, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """`Qwen2DecoderLayer`: pre-RMSNorm attention and MLP, each with a residual."""

  def __init__(self, cfg: DecoderConfig, *, compute_dtype, param_dtype, rngs: nnx.Rngs):
    norm = dict(eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = MLP(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, **norm)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, **norm)

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array, kv: KV | None = None,
               end: jax.Array | None = None, segment_ids: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
    """(B, T, D) -> (B, T, D) and the updated cache `kv` (None without one), as `Attention`."""
    h, kv = self.self_attn(self.input_layernorm(x), positions, key_mask, kv, end, segment_ids)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, kv


class Decoder(nnx.Module):
  """`Qwen2Model`: token embeddings, the layer stack and the final norm."""

  def __init__(self, cfg: DecoderConfig, *, compute_dtype, param_dtype, remat: str = "none", rngs: nnx.Rngs):
    self.remat = remat
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), compute_dtype=compute_dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.layers = layers.stack(lambda r: DecoderLayer(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=r),
                               cfg.num_layers, rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array,
               cache: kv_cache.Cache | None = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, kv_cache.Cache | None]:
    """Input embeddings (B, T, D) -> (final hidden states (B, T, D), the updated cache or None).

    key_mask (B, T) bool marks real tokens (False: padding). With a `kv_cache.Cache`, the T tokens
    are appended to it (the prompt, or one decode step) and attend over everything written before them.
    Without one, `segment_ids` (B, T) int (0 on padding) keeps the samples of packed rows apart.
    """
    if cache is None:
      step = lambda layer, h, _: (sharding.constrain(layer(h, positions, key_mask, segment_ids=segment_ids)[0],
                                                     ACTIVATION_AXES), None)
      x, _ = layers.scan(self.layers, step, x, remat=self.remat)
      return self.norm(x), None
    key_mask = kv_cache.write(cache.key_mask, key_mask, cache.end)

    def cached_step(layer, h, kv):
      h, kv = layer(h, positions, key_mask, kv, cache.end)
      return sharding.constrain(h, ACTIVATION_AXES), kv

    x, (k, v) = layers.scan(self.layers, cached_step, x, (cache.k, cache.v), remat=self.remat)
    cache = kv_cache.Cache(k=sharding.constrain(k, kv_cache.AXES), v=sharding.constrain(v, kv_cache.AXES),
                           key_mask=key_mask, end=cache.end + x.shape[1])
    return self.norm(x), cache
