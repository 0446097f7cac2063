"""What the benchmarks share: model sizes (random weights, so no download) of either family, transformers'
model built from one, and a tokenizer that needs no files."""

import dataclasses
import time

from af3_jax.config import MODEL_TYPES, AF3Config, DecoderConfig, EncoderConfig, RoTEConfig

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<sound>", "[PAD]"]

MODELS = {
    # The tests' tiny model (tests/conftest.py TINY[0], "gqa"): 4 query heads share 2 kv heads.
    "test": AF3Config(
        encoder=EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        decoder=DecoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, intermediate_size=128, rope_theta=5000.0),
        audio_token_id=299),
    # Wider than the test configs so the matmuls, not the dispatch, take the time on a CPU.
    "tiny": AF3Config(
        encoder=EncoderConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
        decoder=DecoderConfig(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=1,
                              head_dim=64, intermediate_size=1024),
        audio_token_id=4095),
    "full": AF3Config(),  # the released AF3: 8,267,215,360 parameters
}


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


def byte_tokenizer(vocab_size: int | None = None):
  """A byte-level tokenizer with no merges (one token per byte) and the chat template's specials, last.
  With `vocab_size`, filler tokens (never produced by encoding; they decode as `<id>`) make it that big,
  so that every id a model of that vocabulary draws decodes."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  fillers = [] if vocab_size is None else [f"<{i}>" for i in range(len(alphabet), vocab_size - len(SPECIAL_TOKENS))]
  tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet + fillers)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(SPECIAL_TOKENS)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="[PAD]")


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
