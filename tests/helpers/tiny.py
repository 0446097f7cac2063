"""The tiny model shapes the tests run (ours and transformers' own tester config), and a tiny
checkpoint in its three layouts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from af3_jax.checkpoints import tiny as tiny_checkpoint
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig, RoTEConfig

try:  # the PyTorch reference; tests that need it skip without it
  import transformers
except ImportError:
  transformers = None

# The tiny checkpoints' weights: a draw whose greedy answers do not collapse onto one repeated token, as a
# random model's often do (test_generate needs varied reference paths, test_infer a printable answer).
SEED = 4


@dataclasses.dataclass(frozen=True)
class Tiny:
  """One tiny model shape. Audio token id is the last vocab entry."""

  name: str
  enc_width: int
  enc_heads: int
  dec_width: int
  dec_heads: int
  kv_heads: int
  head_dim: int
  rope_theta: float
  vocab: int = 300
  layers: int = 2
  music: bool = False  # Music Flamingo: RoTE, and `<|sound_bos|>`, `<|sound_eos|>` just below `<sound>`

  @property
  def audio_token_id(self) -> int:
    return self.vocab - 1

  @property
  def audio_bos_token_id(self) -> int:
    return self.vocab - 3

  @property
  def audio_eos_token_id(self) -> int:
    return self.vocab - 2

  def config(self) -> AF3Config:
    cfg = AF3Config(
        encoder=EncoderConfig(hidden_size=self.enc_width, num_layers=self.layers, num_heads=self.enc_heads,
                              intermediate_size=2 * self.enc_width),
        decoder=DecoderConfig(vocab_size=self.vocab, hidden_size=self.dec_width, num_layers=self.layers,
                              num_heads=self.dec_heads, num_kv_heads=self.kv_heads, head_dim=self.head_dim,
                              intermediate_size=2 * self.dec_width, rope_theta=self.rope_theta),
        audio_token_id=self.audio_token_id)
    if not self.music:
      return cfg
    return dataclasses.replace(cfg, rote=RoTEConfig(), audio_bos_token_id=self.audio_bos_token_id,
                               audio_eos_token_id=self.audio_eos_token_id)

  def hf_config(self):
    config_cls = transformers.MusicFlamingoConfig if self.music else transformers.AudioFlamingo3Config
    return config_cls(**self.config().to_hf_dict())

  def write(self, dst: Path, seed: int = SEED) -> Path:
    """This shape as `convert.tiny` writes a checkpoint (tokenizer included), without its generation
    defaults: decoding is greedy and stops only at max_new_tokens, so tests control both."""
    return tiny_checkpoint.write(dst, config=self.config(), seed=seed, generation=None)


TINY = [
    # GQA (4 query heads share 2 kv heads), a non-default rope theta.
    Tiny("gqa", enc_width=32, enc_heads=2, dec_width=64, dec_heads=4, kv_heads=2, head_dim=16, rope_theta=5000.0),
    # Odd head counts everywhere, one kv head (MQA), head_dim != width / heads.
    Tiny("odd", enc_width=48, enc_heads=3, dec_width=48, dec_heads=3, kv_heads=1, head_dim=24, rope_theta=1e6),
]


# Music Flamingo: an encoder of 48 channels turns 2 x 2 x ceil(int(9.6) / 2) = 20 of them (an odd R).
MUSIC = Tiny("music", enc_width=48, enc_heads=3, dec_width=64, dec_heads=4, kv_heads=2, head_dim=16,
             rope_theta=5000.0, music=True)


@dataclasses.dataclass(frozen=True)
class Tester:
  """The config of transformers' own `AudioFlamingo3ModelTester` (tests/models/audioflamingo3/
  test_modeling_audioflamingo3.py): `<sound>` is id 0 and padding id 1, so padding written as 0 looks
  like audio; 80 mel bins and 30 source positions make 60-frame windows of 15 audio tokens."""

  name: str = "tester"
  vocab: int = 99
  audio_token_id: int = 0
  pad_token_id: int = 1
  num_mel_bins: int = 80
  window: int = 60  # mel frames per window: 2 * max_source_positions

  def hf_config(self):
    return transformers.AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", hidden_size=16, num_attention_heads=4,
                          intermediate_size=16, num_hidden_layers=2, num_mel_bins=self.num_mel_bins,
                          max_source_positions=self.window // 2),
        text_config=dict(model_type="qwen2", vocab_size=self.vocab, hidden_size=32, intermediate_size=36,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=52, pad_token_id=self.pad_token_id),
        audio_token_id=self.audio_token_id)

  def text(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """Random ids other than `<sound>` and padding, as the tester draws them."""
    return rng.integers(2, self.vocab, n)


@dataclasses.dataclass
class Checkpoint:
  tiny: Tiny | Tester
  torch_model: object
  hf: Path  # what `save_pretrained` writes (legacy names), sharded with an index json
  tree: Path  # module-tree names, one file: what `Tiny.write` (`convert.tiny`) writes
  nvidia: Path
