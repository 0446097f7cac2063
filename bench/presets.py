"""What the benchmarks share: model sizes (random weights, so no download) of either family, transformers'
model built from one, the tiny checkpoints' tokenizer (`af3_jax.checkpoints.tiny.tokenizer`: it needs
no files)."""

import dataclasses
import time

from af3_jax.checkpoints import tiny
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig, MODEL_TYPES, RoTEConfig

MODELS = {
    # The tests' tiny model and `python -m convert.tiny`'s: 4 query heads share 2 kv heads.
    "test": tiny.CONFIGS["audioflamingo3"],
    # Wider than the test configs so the matmuls, not the dispatch, take the time on a CPU.
    "tiny": AF3Config(
        encoder=EncoderConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
        decoder=DecoderConfig(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=1,
                              head_dim=64, intermediate_size=1024),
        audio_token_id=4095),
    "full": AF3Config(),  # the released AF3: 8,267,215,360 parameters
}


def with_tokenizer(cfg: AF3Config):
  """(cfg with its audio id where the tokenizer puts `<sound>`, a tokenizer of cfg's vocabulary). The
  tokenizer's `<sound>` is its last id, which every preset but "full" already uses."""
  tok = tiny.tokenizer(cfg.decoder.vocab_size)
  return dataclasses.replace(cfg, audio_token_id=tok.convert_tokens_to_ids("<sound>")), tok


def model_config(size: str, model_type: str = "audioflamingo3") -> AF3Config:
  """The `size` preset (MODELS) as AF3 or as Music Flamingo: the same sizes with rotary time embeddings,
  its bos/eos the two ids below the audio token (the released ids: 151670 and 151671 for `<sound>`
  151669 are above it, which the smaller vocabularies have no room for)."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
  cfg = MODELS[size]
  if model_type == "audioflamingo3":
    return cfg
  if size == "full":
    return AF3Config.music_flamingo()
  return dataclasses.replace(cfg, rote=RoTEConfig(), audio_bos_token_id=cfg.audio_token_id - 2,
                             audio_eos_token_id=cfg.audio_token_id - 1)


def torch_model(cfg: AF3Config, dtype, device: str):
  """transformers' AF3 or Music Flamingo (as `cfg` is) with its own random init, built on `device` directly
  (no host copy of the weights)."""
  import torch
  import transformers

  music = cfg.rote is not None
  config = (transformers.MusicFlamingoConfig if music else transformers.AudioFlamingo3Config)(**cfg.to_hf_dict())
  cls = transformers.MusicFlamingoForConditionalGeneration if music else transformers.AudioFlamingo3ForConditionalGeneration
  torch.manual_seed(0)
  with torch.device(device):
    model = cls._from_config(config, dtype=dtype)
  return model.eval()


class TokenClock:
  """A streamer for transformers' `generate` (it only calls `put` and `end`) that notes when each `put`
  reaches the host: the prompt first, then one per new token."""

  def __init__(self):
    self.times: list[float] = []

  def put(self, value):
    self.times.append(time.perf_counter())

  def end(self):
    pass
