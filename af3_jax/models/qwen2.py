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

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array, cache: kv_cache.Cache | None = None,
               layer: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, kv_cache.Cache | None]:
    """x (B, T, D); positions (B, T) int; key_mask (B, S) bool: the keys that are real tokens.

    Without a cache the keys are the T tokens themselves (S = T). With `cache` (stacked over layers,
    S slots) this is layer `layer`: its new keys and values are written at slots end..end+T-1 of its
    rows first and the queries attend over all S slots. Causal either way. `segment_ids` (B, T) int
    (no cache): a token attends only within its own segment, a sample of a packed row. Returns the
    output (B, T, D) and the updated cache.
    """
    b, t, _ = x.shape
    cfg = self.cfg
    q = rope(self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim), positions, cfg.rope_theta)
    k = rope(self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cache is not None:
      cache = cache.replace(k=kv_cache.write(cache.k, k, cache.end, layer), v=kv_cache.write(cache.v, v, cache.end, layer))
      k, v = cache.k[layer], cache.v[layer]
    # With a cache, new token i sits at slot end + i; the slots after it are empty or in its future.
    o = layers.attention(q, k, v, scale=cfg.head_dim**-0.5, key_mask=key_mask, causal=True,
                         q_offset=None if cache is None else cache.end, segment_ids=segment_ids)
    return self.o_proj(o.reshape(b, t, -1)), cache


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

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array, cache: kv_cache.Cache | None = None,
               layer: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, kv_cache.Cache | None]:
    """(B, T, D) -> (B, T, D) and the updated cache (None without one), as `Attention`."""
    h, cache = self.self_attn(self.input_layernorm(x), positions, key_mask, cache, layer, segment_ids)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, cache


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

    key_mask (B, T) bool marks real tokens (False: padding). With a `kv_cache.Cache`, the T tokens are
    appended to it at its `end` (one for all rows, or each row's own) and attend over everything written
    before them: the prompt, or one decode step. Without one, `segment_ids` (B, T) int (0 on padding)
    keeps the samples of packed rows apart.
    """
    if cache is None:
      step = lambda layer, h, _: (sharding.constrain(layer(h, positions, key_mask, segment_ids=segment_ids)[0],
                                                     ACTIVATION_AXES), None)
      x, _ = layers.scan(self.layers, step, x, remat=self.remat)
      return self.norm(x), None
    cache = cache.replace(key_mask=kv_cache.write(cache.key_mask, key_mask, cache.end))

    # The cache is the scan's carry, not its per-layer input and output: each layer writes only its
    # new slots (in place), where per-layer outputs would copy the whole cache at every step.
    def cached_step(layer, carry, index):
      h, cache = carry
      h, cache = layer(h, positions, cache.key_mask, cache, index)
      return (sharding.constrain(h, ACTIVATION_AXES), cache), None

    (x, cache), _ = layers.scan(self.layers, cached_step, (x, cache), jnp.arange(cache.k.shape[0]),
                                remat=self.remat)
    cache = cache.replace(k=sharding.constrain(cache.k, kv_cache.AXES), v=sharding.constrain(cache.v, kv_cache.AXES),
                          end=cache.end + x.shape[1])
    return self.norm(x), cache
