"""The model's FLOPs for a batch, counted from its shape: what MFU divides by the device's peak.

A multiply-add is 2 FLOPs. Counted: every matmul (the encoder's convolutions and linears, the projector,
the decoder's linears and LM head) and attention's two products (scores and the weighted sum of values)
over the (query, key) pairs actually attended. Not counted: normalisation, activations, softmax, RoPE
and the embedding lookup, a few percent at most. Training is 3x the forward pass (the backward pass
computes gradients for activations and weights, 2x), the usual convention (PaLM's MFU), whatever the
trainable set; a frozen encoder or decoder does less work, so a partial stage's MFU reads high.

The decoder's work depends on real tokens (not padding) and on the pairs a causal mask keeps: a row
holding samples of lengths n_i attends sum n_i (n_i + 1) / 2 pairs. Each audio window runs the whole
encoder over its `max_source_positions` positions, as upstream does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig

TRAIN_FACTOR = 3  # forward + backward (2x)


def decoder_flops_per_token(d: DecoderConfig) -> int:
  """One token through the decoder's linears and the LM head, attention's products excluded."""
  attn = d.hidden_size * (d.num_heads + 2 * d.num_kv_heads) * d.head_dim + d.num_heads * d.head_dim * d.hidden_size
  mlp = 3 * d.hidden_size * d.intermediate_size
  return 2 * (d.num_layers * (attn + mlp) + d.hidden_size * d.vocab_size)


def decoder_flops_per_pair(d: DecoderConfig) -> int:
  """One (query, key) pair: q.k over the head dim and the weighted value, in every head and layer."""
  return 2 * 2 * d.num_layers * d.num_heads * d.head_dim


def window_flops(cfg: AF3Config) -> int:
  """One 30 s window through the encoder (its full attention included) and the projector."""
  e: EncoderConfig = cfg.encoder
  positions = e.max_source_positions
  conv = 2 * (e.mel_frames * e.num_mel_bins * 3 * e.hidden_size + positions * 3 * e.hidden_size ** 2)
  layers = e.num_layers * (2 * positions * (4 * e.hidden_size ** 2 + 2 * e.hidden_size * e.intermediate_size)
                           + 4 * positions ** 2 * e.hidden_size)
  pooled = positions // 2  # the projector sees the average-pooled frames
  projector = 2 * pooled * (e.hidden_size + cfg.decoder.hidden_size) * cfg.decoder.hidden_size
  return conv + layers + projector


def forward_flops(cfg: AF3Config, *, tokens: int, attention_pairs: int, windows: int) -> int:
  """A forward pass over `tokens` real tokens attending `attention_pairs` pairs, with `windows` windows."""
  return (tokens * decoder_flops_per_token(cfg.decoder) + attention_pairs * decoder_flops_per_pair(cfg.decoder)
          + windows * window_flops(cfg))


def train_flops(cfg: AF3Config, *, tokens: int, attention_pairs: int, windows: int) -> int:
  """One training step (forward and backward) over that batch."""
  return TRAIN_FACTOR * forward_flops(cfg, tokens=tokens, attention_pairs=attention_pairs, windows=windows)


def batch_counts(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """What a training batch holds, as scalars: `real_tokens` (not padding), `token_slots` (all
  positions), `attention_pairs` (the causal (query, key) pairs of the real tokens, within each packed
  sample) and `audio_windows` (windows holding any audio). Any leading axes (micro-batches) are summed."""
  ids = batch["input_ids"]
  mask = batch.get("attention_mask")
  real = jnp.ones(ids.shape, jnp.int32) if mask is None else (mask != 0).astype(jnp.int32)
  # A token at position p (counted from its own sample's start) attends p + 1 keys.
  positions = batch.get("position_ids")
  if positions is None:
    positions = jnp.cumsum(real, axis=-1) - 1
  windows = batch.get("input_features_mask")
  # Pairs in float32: a stage 5 step's 128 rows of 8192 tokens attend 4.3e9, past int32.
  return {"real_tokens": real.sum(), "token_slots": jnp.int32(ids.size),
          "attention_pairs": ((positions + 1) * real).astype(jnp.float32).sum(),
          "audio_windows": jnp.int32(0) if windows is None else (windows != 0).any(-1).sum().astype(jnp.int32)}
