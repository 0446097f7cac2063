"""AF-Whisper audio encoder: mirrors transformers' `AudioFlamingo3Encoder`.

A Whisper-large-v3 encoder (conv front end, stored position table, pre-LN blocks) followed by
AvgPool1d(2, 2) over time and then the single final LayerNorm (pool first, LN once: docs/upstream.md#encoder).
Shape letters: W windows (the batch here), M mel bins, F mel frames (3000), T positions after conv2
(1500), P pooled frames (750), D width, N heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from af3_jax import sharding
from af3_jax.config import EncoderConfig
from af3_jax.models import attention, layers


def conv_lengths(mel_lengths: jax.Array) -> jax.Array:
  """Valid positions after conv2 (stride 2, pad 1) for `mel_lengths` valid mel frames."""
  return (mel_lengths - 1) // 2 + 1


def pooled_lengths(mel_lengths: jax.Array) -> jax.Array:
  """Valid pooled frames (audio tokens) per window: `_get_feat_extract_output_lengths` upstream."""
  return (conv_lengths(mel_lengths) - 2) // 2 + 1


def tokens_per_window(cfg: EncoderConfig) -> int:
  """Audio tokens (pooled frames) of a full window: 750 in AF3."""
  return int(pooled_lengths(cfg.mel_frames))


class Attention(nnx.Module):
  """`AudioFlamingo3Attention`: bidirectional, k_proj has no bias."""

  def __init__(self, cfg: EncoderConfig, *, compute_dtype, param_dtype, rngs: nnx.Rngs):
    d, kw = cfg.hidden_size, dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.q_proj = layers.Linear(d, d, use_bias=True, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Linear(d, d, use_bias=False, axes=("embed", "heads"), **kw)
    self.v_proj = layers.Linear(d, d, use_bias=True, axes=("embed", "heads"), **kw)
    self.out_proj = layers.Linear(d, d, use_bias=True, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, kv_lengths: jax.Array) -> jax.Array:
    w, t, _ = x.shape
    split = lambda y: y.reshape(w, t, self.num_heads, self.head_dim)
    # Upstream scales q before QK^T; 1/sqrt(H) is a power of two for H=64, so either order is exact.
    o = attention.attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                         scale=self.head_dim**-0.5, kv_lengths=kv_lengths)
    return self.out_proj(o.reshape(w, t, -1))


class EncoderLayer(nnx.Module):
  """`AudioFlamingo3EncoderLayer`: pre-LN attention and GELU MLP, each with a residual."""

  def __init__(self, cfg: EncoderConfig, *, compute_dtype, param_dtype, rngs: nnx.Rngs):
    d, kw = cfg.hidden_size, dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    norm = dict(eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(cfg, **kw)
    self.self_attn_layer_norm = layers.LayerNorm(d, **norm)
    self.fc1 = layers.Linear(d, cfg.intermediate_size, use_bias=True, axes=("embed", "mlp"), **kw)
    self.fc2 = layers.Linear(cfg.intermediate_size, d, use_bias=True, axes=("mlp", "embed"), **kw)
    self.final_layer_norm = layers.LayerNorm(d, **norm)

  def __call__(self, x: jax.Array, kv_lengths: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.self_attn_layer_norm(x), kv_lengths)
    h = jax.nn.gelu(self.fc1(self.final_layer_norm(x)), approximate=False)
    x = x + self.fc2(h)
    if x.dtype == jnp.float16:  # upstream clamps fp16 residuals to stay finite
      big = jnp.finfo(jnp.float16).max - 1000
      x = jnp.clip(x, -big, big)
    return x


class AudioEncoder(nnx.Module):
  """`AudioFlamingo3Encoder`: (W, M, F) log-mel windows -> (W, P, D) pooled frames."""

  def __init__(self, cfg: EncoderConfig, *, compute_dtype, param_dtype, remat: str | None = None, rngs: nnx.Rngs):
    d, kw = cfg.hidden_size, dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat
    self.conv1 = layers.Conv1d(cfg.num_mel_bins, d, kernel_size=3, stride=1, padding=1,
                               axes=("mel", "embed"), **kw)
    self.conv2 = layers.Conv1d(d, d, kernel_size=3, stride=2, padding=1, axes=("embed", "embed"), **kw)
    # A frozen table in the checkpoint (Whisper's sinusoids); loaded, never regenerated.
    self.embed_positions = layers.Embed(cfg.max_source_positions, d, axes=("audio_len", "embed"), **kw)
    self.layers = layers.stack(lambda r: EncoderLayer(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=r),
                               cfg.num_layers, rngs)
    self.layer_norm = layers.LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)

  def embed(self, features: jax.Array) -> jax.Array:
    """Conv front end plus positions: (W, M, F) -> (W, T, D)."""
    x = jnp.swapaxes(features, 1, 2)  # channels last for our Conv1d
    x = jax.nn.gelu(self.conv1(x), approximate=False)
    x = jax.nn.gelu(self.conv2(x), approximate=False)
    table = self.embed_positions.embedding[...]
    if x.shape[1] != table.shape[0]:
      raise ValueError(f"the encoder takes exactly {2 * table.shape[0]} mel frames per window, "
                       f"got {features.shape[-1]}")
    return x + table.astype(x.dtype)

  def __call__(self, features: jax.Array, features_mask: jax.Array) -> jax.Array:
    """features (W, M, F) float; features_mask (W, F) of 0/1 -> (W, P, D) in the compute dtype."""
    # Keys past each window's valid length are masked; padded queries are still computed (upstream).
    kv_lengths = conv_lengths(features_mask.astype(jnp.int32).sum(-1))
    x = self.embed(features)
    step = lambda layer, h, _: (sharding.constrain(layer(h, kv_lengths), ("batch", "audio_len", None)), None)
    x, _ = layers.scan(self.layers, step, x, remat=self.remat)
    w, t, d = x.shape
    x = x.reshape(w, t // 2, 2, d).mean(axis=2)  # AvgPool1d(2, 2), then the one final LayerNorm
    return self.layer_norm(x)
