"""Model configuration: frozen, hashable dataclasses read from a checkpoint's `config.json`.

Mirrors transformers' `AudioFlamingo3Config` (audio_config = `AudioFlamingo3EncoderConfig`, text_config =
`Qwen2Config`) and `MusicFlamingoConfig`, which is the same model plus rotary time embeddings (`RoTEConfig`)
and audio bos/eos tokens. Jitted code and modules only ever see these dataclasses, never a dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """AF-Whisper encoder (`AudioFlamingo3EncoderConfig`)."""

  num_mel_bins: int = 128
  hidden_size: int = 1280
  num_layers: int = 32
  num_heads: int = 20
  intermediate_size: int = 5120
  max_source_positions: int = 1500

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mel_frames(self) -> int:
    """Mel frames of one window: conv2's stride 2 maps them onto the position table (3000 in AF3)."""
    return 2 * self.max_source_positions


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Qwen2 decoder (`Qwen2Config`)."""

  vocab_size: int = 151672
  hidden_size: int = 3584
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  head_dim: int = 128
  intermediate_size: int = 18944
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  max_position_embeddings: int = 32768


@dataclasses.dataclass(frozen=True)
class RoTEConfig:
  """Music Flamingo's rotary time embeddings on the encoder output (`MusicFlamingoRotaryEmbedding`):
  `rope_parameters` and `audio_frame_step` of `MusicFlamingoConfig`, which also takes the theta for its
  `max_position_embeddings` (the divisor of both angle axes)."""

  theta: float = 1200.0
  partial_rotary_factor: float = 0.2
  mel_frame_seconds: float = 0.01  # one input mel frame (hop 160 at 16 kHz)

  def pairs(self, width: int) -> int:
    """Channel pairs each axis (window, frame) rotates: ceil(R / 2) frequencies for R = int(width * factor),
    as upstream's `arange(0, R, 2)`; 2 axes x 2 channels each, so 4 x pairs channels turn (512 of 1280)."""
    return -(-int(width * self.partial_rotary_factor) // 2)


MODEL_TYPES = ("audioflamingo3", "musicflamingo")


@dataclasses.dataclass(frozen=True)
class AF3Config:
  """The whole model. Defaults are the released AF3 (8,267,215,360 parameters); with `rote` (and the audio
  bos/eos ids, which only the processor uses) it is Music Flamingo, whose weights have the same names."""

  encoder: EncoderConfig = EncoderConfig()
  decoder: DecoderConfig = DecoderConfig()
  audio_token_id: int = 151669
  projector_bias: bool = True
  rote: RoTEConfig | None = None
  audio_bos_token_id: int | None = None
  audio_eos_token_id: int | None = None

  @property
  def model_type(self) -> str:
    return "musicflamingo" if self.rote is not None else "audioflamingo3"

  @classmethod
  def music_flamingo(cls, **kw) -> AF3Config:
    """`MusicFlamingoConfig()`'s defaults (`nvidia/music-flamingo-2601-hf`): AF3's sizes with RoTE."""
    return cls(**{"rote": RoTEConfig(), "audio_bos_token_id": 151670, "audio_eos_token_id": 151671, **kw})

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> AF3Config:
    """Reads transformers' `AudioFlamingo3Config.to_dict()` or `MusicFlamingoConfig.to_dict()` (what
    `config.json` holds); a config without a model_type is AF3's."""
    model_type = d.get("model_type") or "audioflamingo3"
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {model_type!r} is not supported (one of {', '.join(MODEL_TYPES)})")
    if d.get("projector_hidden_act", "gelu") != "gelu":
      raise ValueError(f"projector_hidden_act {d['projector_hidden_act']!r} is not supported (AF3 uses gelu)")
    encoder = encoder_config(_section(d, "audio_config"))
    music = {}
    if model_type == "musicflamingo":
      music = dict(rote=rote_config(d, encoder), audio_bos_token_id=d.get("audio_bos_token_id", 151670),
                   audio_eos_token_id=d.get("audio_eos_token_id", 151671))
    return cls(
        encoder=encoder,
        decoder=decoder_config(_section(d, "text_config")),
        audio_token_id=d.get("audio_token_id", 151669),
        projector_bias=d.get("projector_bias", True),
        **music,
    )

  @classmethod
  def from_json(cls, path: str | Path) -> AF3Config:
    return parse_json(path, cls.from_hf_dict)

  def to_hf_dict(self) -> dict[str, Any]:
    """The inverse of `from_hf_dict`: a `config.json` that transformers loads."""
    e, t = self.encoder, self.decoder
    music = {}
    if self.rote is not None:
      music = {
          "audio_bos_token_id": self.audio_bos_token_id,
          "audio_eos_token_id": self.audio_eos_token_id,
          "audio_frame_step": self.rote.mel_frame_seconds,
          "rope_parameters": {"rope_type": "default", "rope_theta": self.rote.theta,
                              "partial_rotary_factor": self.rote.partial_rotary_factor},
      }
    return {
        "model_type": self.model_type,
        "architectures": ["MusicFlamingoForConditionalGeneration" if music else "AudioFlamingo3ForConditionalGeneration"],
        **music,
        "audio_token_id": self.audio_token_id,
        "projector_hidden_act": "gelu",
        "projector_bias": self.projector_bias,
        "audio_config": {
            "model_type": "audioflamingo3_encoder",
            "num_mel_bins": e.num_mel_bins,
            "hidden_size": e.hidden_size,
            "num_hidden_layers": e.num_layers,
            "num_attention_heads": e.num_heads,
            "intermediate_size": e.intermediate_size,
            "max_source_positions": e.max_source_positions,
            "activation_function": "gelu",
        },
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "intermediate_size": t.intermediate_size,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "use_sliding_window": False,
        },
    }


def read_json(path: str | Path) -> dict[str, Any]:
  """The JSON object in `path`. Every file we read holds an object; anything else (missing, not UTF-8,
  not JSON, or another JSON value) is a one-line ValueError naming the file."""
  try:
    value = json.loads(Path(path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ValueError(f"{path}: cannot read JSON ({e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def parse_json(path: str | Path, parse: Callable[[dict[str, Any]], Any]) -> Any:
  """`parse` of the JSON object in `path`, its ValueErrors prefixed with the file's name."""
  d = read_json(path)
  try:
    return parse(d)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def _section(d: dict[str, Any], name: str) -> dict[str, Any]:
  """The object `d[name]`, {} when absent or null."""
  value = d.get(name)
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
  return value


def _pick(d: dict[str, Any], *names: str, default: Any = None) -> Any:
  """First present key: HF configs and the Whisper-style NVIDIA ones spell fields differently."""
  for n in names:
    if d.get(n) is not None:
      return d[n]
  return default


def _positive(d: dict[str, Any], *names: str, default: int | float, kind: type = int) -> int | float:
  """`_pick` for a size or constant, checked here so a config of strings or zeros fails on load, naming
  the field, not deep inside the model."""
  name = next((n for n in names if d.get(n) is not None), None)
  value = default if name is None else d[name]
  number = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
  if not (number and math.isfinite(value) and value > 0):
    raise ValueError(f"{name or names[0]} must be a positive {kind.__name__}, got {value!r}")
  return kind(value)


def encoder_config(d: dict[str, Any]) -> EncoderConfig:
  """From `audio_config` (HF) or the NVIDIA `sound_tower/config.json` (Whisper field names)."""
  act = _pick(d, "activation_function", default="gelu")
  if act != "gelu":
    raise ValueError(f"encoder activation {act!r} is not supported (AF-Whisper uses exact gelu)")
  return EncoderConfig(
      num_mel_bins=_positive(d, "num_mel_bins", default=128),
      hidden_size=_positive(d, "hidden_size", "d_model", default=1280),
      num_layers=_positive(d, "num_hidden_layers", "encoder_layers", default=32),
      num_heads=_positive(d, "num_attention_heads", "encoder_attention_heads", default=20),
      intermediate_size=_positive(d, "intermediate_size", "encoder_ffn_dim", default=5120),
      max_source_positions=_positive(d, "max_source_positions", default=1500),
  )


def rote_config(d: dict[str, Any], encoder: EncoderConfig) -> RoTEConfig:
  """From `MusicFlamingoConfig`'s `rope_parameters` (partial_rotary_factor may sit at the top level, as
  its constructor takes it) and `audio_frame_step`."""
  rope = _section(d, "rope_parameters")
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"rope_parameters.rope_type {rope['rope_type']!r} is not supported (Music Flamingo "
                     "uses default rotary time embeddings)")
  theta = _positive(rope, "rope_theta", default=1200.0, kind=float)
  factor = _positive(rope, "partial_rotary_factor", default=_positive(d, "partial_rotary_factor", default=0.2,
                                                                       kind=float), kind=float)
  rote = RoTEConfig(theta=theta, partial_rotary_factor=factor,
                    mel_frame_seconds=_positive(d, "audio_frame_step", default=0.01, kind=float))
  if 4 * rote.pairs(encoder.hidden_size) > encoder.hidden_size:
    raise ValueError(f"partial_rotary_factor {factor} turns more than the encoder's {encoder.hidden_size} channels "
                     "(two axes of int(width * factor) each)")
  frames = (encoder.max_source_positions - 2) // 2 + 1
  if frames > int(theta):
    # Upstream's frame-axis table has int(theta) rows, one per pooled frame of a window.
    raise ValueError(f"rope_theta {theta} is below the {frames} audio frames of a window")
  return rote


def decoder_config(d: dict[str, Any]) -> DecoderConfig:
  """From `text_config` (HF) or the NVIDIA `llm/config.json` (a plain `Qwen2Config`)."""
  rope = _section(d, "rope_parameters") or _section(d, "rope_scaling")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"rope_type {rope_type!r} is not supported (AF3 uses default RoPE)")
  if d.get("use_sliding_window"):
    raise ValueError("use_sliding_window=True is not supported (AF3 attends over the full context)")
  if d.get("tie_word_embeddings"):
    raise ValueError("tie_word_embeddings=True is not supported (AF3 has a separate lm_head)")
  if _pick(d, "hidden_act", default="silu") != "silu":
    raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (Qwen2 uses silu)")
  hidden = _positive(d, "hidden_size", default=3584)
  heads = _positive(d, "num_attention_heads", default=28)
  return DecoderConfig(
      vocab_size=_positive(d, "vocab_size", default=151672),
      hidden_size=hidden,
      num_layers=_positive(d, "num_hidden_layers", default=28),
      num_heads=heads,
      num_kv_heads=_positive(d, "num_key_value_heads", default=heads),
      head_dim=_positive(d, "head_dim", default=hidden // heads),
      intermediate_size=_positive(d, "intermediate_size", default=18944),
      rms_norm_eps=_positive(d, "rms_norm_eps", default=1e-6, kind=float),
      # transformers 5 keeps rope_theta in rope_parameters, older configs at the top level.
      rope_theta=_positive(rope, "rope_theta", default=_positive(d, "rope_theta", default=1e6, kind=float),
                           kind=float),
      max_position_embeddings=_positive(d, "max_position_embeddings", default=32768),
  )
