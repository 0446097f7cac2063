"""What the benchmarks share: model sizes (random weights, so no download), transformers' AF3 built from
one, and a tokenizer that needs no files."""

import time

from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig

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
  """transformers' AF3 with its own random init, built on `device` directly (no host copy of the weights)."""
  import torch
  import transformers

  config = transformers.AudioFlamingo3Config(**cfg.to_hf_dict())
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.AudioFlamingo3ForConditionalGeneration._from_config(config, dtype=dtype)
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
