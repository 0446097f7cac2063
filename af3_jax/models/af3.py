"""Audio Flamingo 3: mirrors transformers' `AudioFlamingo3ForConditionalGeneration`, and with a RoTE
config `MusicFlamingoForConditionalGeneration` (the encoder output turned by time, `rote.py`, before the
projector; nothing else differs in the model).

Encoder windows -> projector -> frames that replace the `<sound>` tokens of the prompt in order
(window-major, then row-major over batch and sequence, as HF's `masked_scatter`), then the Qwen2
decoder and an untied LM head. Unlike HF, a padded position (attention mask 0) is never audio, even
when its id is the audio token's. Everything here has static shapes and runs under `jax.jit`; inputs are
checked on the host by `af3_jax.checkpoints.pretrained.Model` before they get here.
Shape letters: B batch, T sequence, W windows, F mel frames, P pooled frames per window (750), D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af3_jax.config import AF3Config
from af3_jax.models import layers, rote, whisper
from af3_jax.models.projector import Projector
from af3_jax.models.qwen2 import Decoder


def audio_embed_mask_from_features(features_mask: jax.Array, frames_per_window: int) -> jax.Array:
  """(W, F) mel mask -> (W, P) bool: the pooled frames HF keeps (`get_audio_features`). numpy in, numpy out
  (the engine's host side compiles nothing for it), or jax in, jax out."""
  n = whisper.pooled_lengths(features_mask.astype(np.int32).sum(-1))
  return np.arange(frames_per_window)[None, :] < n[:, None]


def audio_positions(input_ids, attention_mask, audio_token_id: int):
  """(B, T) bool, numpy or jax alike: the positions audio frames fill, the `<sound>` tokens that
  `attention_mask` (None: all real) marks real. Padding is never audio, whatever id it holds: a pad id
  equal to the audio id would otherwise take frames and shift every later one."""
  is_audio = input_ids == audio_token_id
  return is_audio if attention_mask is None else is_audio & (attention_mask != 0)


def merge_audio(embeds: jax.Array, is_audio: jax.Array, frames: jax.Array, frames_mask: jax.Array) -> jax.Array:
  """Puts the selected audio frames into the audio token positions, in order.

  embeds (B, T, D); is_audio (B, T) bool; frames (W, P, D); frames_mask (W, P) bool. The k-th audio
  token (row-major) receives the k-th selected frame (window-major). A gather plus `where` keeps the
  shapes static (no boolean scatter); the caller guarantees the counts agree.
  """
  flat = frames.reshape(-1, frames.shape[-1])
  (selected,) = jnp.nonzero(frames_mask.reshape(-1), size=flat.shape[0], fill_value=0)
  k = jnp.cumsum(is_audio.reshape(-1)).reshape(is_audio.shape) - 1
  gathered = flat[selected[jnp.clip(k, 0, flat.shape[0] - 1)]]
  return jnp.where(is_audio[..., None], gathered.astype(embeds.dtype), embeds)


class AudioFlamingo3(nnx.Module):
  """The full model. Attribute names are HF's, so parameter paths are HF's (see `names.py`)."""

  def __init__(self, cfg: AF3Config, *, compute_dtype=jnp.float32, param_dtype=jnp.float32, remat: str | None = None,
               rngs: nnx.Rngs):
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg = cfg
    self.audio_tower = whisper.AudioEncoder(cfg.encoder, remat=remat, **kw)
    self.multi_modal_projector = Projector(cfg.encoder.hidden_size, cfg.decoder.hidden_size,
                                           use_bias=cfg.projector_bias, **kw)
    self.language_model = Decoder(cfg.decoder, remat=remat, **kw)
    self.lm_head = layers.Linear(cfg.decoder.hidden_size, cfg.decoder.vocab_size, use_bias=False,
                                 axes=("embed", "vocab"), **kw)

  def audio_frames(self, input_features: jax.Array, input_features_mask: jax.Array,
                   window_index: jax.Array | None = None) -> jax.Array:
    """(W, M, F) features -> (W, P, D) projected frames, before any selection. With RoTE, window_index
    (W,) gives each window's index within its audio (`rote.window_indices`)."""
    x = self.audio_tower(input_features, input_features_mask)
    if self.cfg.rote is not None:
      if window_index is None:
        raise ValueError("Music Flamingo's audio frames need each window's index within its audio "
                         "(rote.window_indices)")
      x = rote.rotate(x, window_index, self.cfg.rote)
    return self.multi_modal_projector(x)

  def embed(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            input_features: jax.Array | None = None, input_features_mask: jax.Array | None = None,
            audio_embed_mask: jax.Array | None = None) -> jax.Array:
    """Token embeddings (B, T, D) with the real `<sound>` positions (`audio_positions`) filled from the
    audio; attention_mask (B, T) marks real tokens (None: all)."""
    x = self.language_model.embed_tokens(input_ids)
    if input_features is None:
      return x
    if audio_embed_mask is None:
      audio_embed_mask = audio_embed_mask_from_features(input_features_mask,
                                                        whisper.tokens_per_window(self.cfg.encoder))
    is_audio = audio_positions(input_ids, attention_mask, self.cfg.audio_token_id)
    window_index = None
    if self.cfg.rote is not None:
      window_index = rote.window_indices(is_audio, audio_embed_mask.astype(jnp.int32).sum(-1))
    frames = self.audio_frames(input_features, input_features_mask, window_index)
    return merge_audio(x, is_audio, frames, audio_embed_mask)

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                    input_features: jax.Array | None = None, input_features_mask: jax.Array | None = None,
                    audio_embed_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, *, right_padded: bool = False) -> jax.Array:
    """The decoder's final hidden states (B, T, D), before the LM head (the loss applies it in chunks).

    attention_mask (B, T) marks real tokens (left padding, or with `right_padded` each row's real tokens
    first, as the training pipeline pads: see `qwen2.Decoder`); positions default to its cumulative sum
    minus one, as HF `generate` derives them. A packed row (training) holds several samples: segment_ids
    (B, T) int numbers them from 1 (0 on padding), each attends only to itself, and position_ids restart
    at 0 for each, as NVIDIA's training packs them (`llava_arch.py`, `repack_multimodal_data`).
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if position_ids is None:
      position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    x = self.embed(input_ids, attention_mask, input_features, input_features_mask, audio_embed_mask)
    hidden, _ = self.language_model(x, position_ids, attention_mask.astype(bool), segment_ids=segment_ids,
                                    right_padded=right_padded)
    return hidden

  def __call__(self, input_ids: jax.Array, **inputs) -> jax.Array:
    """Logits (B, T, V) in the compute dtype; takes `hidden_states`' arguments."""
    return self.lm_head(self.hidden_states(input_ids, **inputs))
