"""The model's FLOPs for a batch, counted from its shape: what MFU divides by the device's peak.

A multiply-add is 2 FLOPs. Counted: every matmul (the encoder's convolutions and linears, the projector,
the decoder's linears and LM head, a LoRA's two products) and attention's two products (scores and the
weighted sum of values) over the (query, key) pairs actually attended. Not counted: normalisation,
activations, softmax, RoPE and the embedding lookup, a few percent at most.

Training adds the backward pass, product by product. A product of two operands (an activation and a
weight, or two activations in attention) costs its forward FLOPs once more for each operand that needs a
gradient: a weight when the stage trains it, an activation when it depends on a trained weight. So a
stage that trains everything costs 3x the forward pass (PaLM's convention) less the first convolution's
gradient for its input (the mel features); one that trains the projector alone runs the backward through
the decoder (activation gradients only) and not at all through the encoder; LoRA trains only its own
products, and nothing before the first decoder layer needs a gradient. The work that remat or the loss's
chunks recompute is not counted: MFU counts the model's FLOPs, not those a memory plan adds.

The decoder's work depends on real tokens (not padding) and on the pairs a causal mask keeps: a row
holding samples of lengths n_i attends sum n_i (n_i + 1) / 2 pairs. Each audio window runs the whole
encoder over its `max_source_positions` positions, as upstream does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from af3_jax.config import AF3Config, DecoderConfig

# What each of `train_step.TRAINABLE`'s sets trains ("decoder": its linears, embedding table and LM head).
_TRAINED = {
    "projector": {"projector"},
    "encoder_projector": {"encoder", "projector"},
    "all": {"encoder", "projector", "decoder"},
    "lora": {"lora"},
}


@dataclasses.dataclass
class _Count:
  """FLOPs summed over the model's products in forward order. `live`: whether the activations that reach
  the next product depend on a trained weight (then they need a gradient)."""

  forward: float = 0.0
  backward: float = 0.0
  live: bool = False

  def linear(self, flops: float, trained: bool, lora: tuple[float, float] = (0.0, 0.0)) -> None:
    """Linears that read the current activations: `flops` through their weights; `lora`: the FLOPs of
    their adapters' products x A and (x A) B (both weights trained; (x A) always needs a gradient)."""
    down, up = lora
    self.forward += flops + down + up
    self.backward += flops * (self.live + trained) + down * (self.live + 1) + up * 2
    self.live = self.live or trained or down > 0

  def attention(self, flops: float) -> None:
    """Attention's products, whose operands (queries, keys, weights, values) are all activations."""
    self.forward += flops
    self.backward += 2 * flops * self.live


def _count(cfg: AF3Config, *, tokens: float, attention_pairs: float, windows: float, trained: set[str],
           lora_rank: int = 0) -> _Count:
  e, d = cfg.encoder, cfg.decoder
  c = _Count()
  positions, pooled = e.max_source_positions, e.max_source_positions // 2  # the projector sees pooled frames
  enc = "encoder" in trained
  c.linear(windows * 2 * e.mel_frames * e.num_mel_bins * 3 * e.hidden_size, enc)  # conv1, over the mel features
  c.linear(windows * 2 * positions * (3 * e.hidden_size ** 2 + e.num_layers * (
      4 * e.hidden_size ** 2 + 2 * e.hidden_size * e.intermediate_size)), enc)  # conv2, the layers' linears
  c.attention(windows * e.num_layers * 4 * positions ** 2 * e.hidden_size)
  c.linear(windows * 2 * pooled * e.hidden_size * d.hidden_size, "projector" in trained)
  c.linear(windows * 2 * pooled * d.hidden_size ** 2, "projector" in trained)

  dec = "decoder" in trained
  c.live = c.live or dec  # a trained embedding table
  q, kv, width, mlp = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.hidden_size, d.intermediate_size
  r = lora_rank if "lora" in trained else 0

  def lora(ins: tuple[int, ...], outs: tuple[int, ...]) -> tuple[float, float]:
    return tokens * 2 * r * sum(ins), tokens * 2 * r * sum(outs)

  for _ in range(d.num_layers):
    c.linear(tokens * 2 * width * (q + 2 * kv), dec, lora((width,) * 3, (q, kv, kv)))
    c.attention(attention_pairs * 4 * q)
    c.linear(tokens * 2 * q * width, dec, lora((q,), (width,)))
    c.linear(tokens * 4 * width * mlp, dec, lora((width, width), (mlp, mlp)))  # gate and up
    c.linear(tokens * 2 * mlp * width, dec, lora((mlp,), (width,)))
  c.linear(tokens * 2 * width * d.vocab_size, dec)  # the LM head
  return c


def decoder_flops_per_token(d: DecoderConfig) -> int:
  """One token through the decoder's linears and the LM head, attention's products excluded."""
  return int(_count(AF3Config(decoder=d), tokens=1, attention_pairs=0, windows=0, trained=set()).forward)


def forward_flops(cfg: AF3Config, *, tokens: float, attention_pairs: float, windows: float) -> float:
  """A forward pass over `tokens` real tokens attending `attention_pairs` pairs, with `windows` windows."""
  return _count(cfg, tokens=tokens, attention_pairs=attention_pairs, windows=windows, trained=set()).forward


def train_flops(cfg: AF3Config, *, tokens: float, attention_pairs: float, windows: float, trainable: str = "all",
                lora_rank: int = 0) -> float:
  """One training step (forward and backward) over that batch for a stage's trainable set (a key of
  `train_step.TRAINABLE`; "lora" with its adapters' `lora_rank`)."""
  if trainable not in _TRAINED or (trainable == "lora") != (lora_rank > 0):
    raise ValueError(f"trainable must be one of {sorted(_TRAINED)}, with a lora_rank for lora alone; got "
                     f"{trainable!r}, rank {lora_rank}")
  c = _count(cfg, tokens=tokens, attention_pairs=attention_pairs, windows=windows, trained=_TRAINED[trainable],
             lora_rank=lora_rank)
  return c.forward + c.backward


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
