"""Tiny random checkpoints: a complete model folder with random weights, for trying every tool without
the released weights (`python -m convert.tiny`), and the models the tests compare against PyTorch.

The folder is laid out as the HF release is: `config.json`, `model.safetensors` (transformers' names),
the tokenizer (byte-level BPE, `<sound>` its last id; Music Flamingo's `<|sound_bos|>` and `<|sound_eos|>`
just below it) with the chat template, the processor's config
(Whisper features, 128 mel bins), `generation_config.json`, and optionally a think-mode LoRA in
`think/`. Every tensor is drawn at random, biases and norm weights included, so a wrong transpose,
bias or norm cannot hide behind an init of zeros and ones. Writing one needs neither torch nor a
network.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from af3_jax import sharding
from af3_jax.checkpoints import lora, safetensors
from af3_jax.checkpoints.pretrained import abstract_model
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig, RoTEConfig

# The model each model type (config.json's `model_type`) writes by default: 2 layers each side, 4 query
# heads sharing 2 kv heads, a non-default RoPE theta, and a 300-token vocabulary whose last id is
# `<sound>`; Music Flamingo adds rotary time embeddings and its audio bos/eos, the two ids below.
_AF3 = AF3Config(
    encoder=EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    decoder=DecoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, intermediate_size=128, rope_theta=5000.0),
    audio_token_id=299)
CONFIGS = {
    "audioflamingo3": _AF3,
    "musicflamingo": dataclasses.replace(_AF3, rote=RoTEConfig(), audio_bos_token_id=297, audio_eos_token_id=298),
}
MODEL_TYPES = tuple(CONFIGS)

# Qwen2's chat tokens and AF3's, in the order of the release's added tokens; `<sound>` last. Music
# Flamingo frames each audio's tokens with two more, just before `<sound>`.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<vila/sentinel>", "[BOS]", "[PAD]", "<sound>"]
MUSIC_TOKENS = ["<|sound_bos|>", "<|sound_eos|>"]
_CORPUS = ("You are a helpful assistant. What is in this audio? Describe the sound. Transcribe the input "
           "speech. The spoken content of the audio is a dog barking while music plays. Please think and "
           "reason about the input audio before you respond. Compare the first and the second clip.")

# transformers' AF3 processor template, restated: a default system turn, then each message as
# <|im_start|>role\n ... <|im_end|>\n, where a list content renders one <sound> (if it has any audio)
# followed by all its text items joined with no separator.
CHAT_TEMPLATE = (
    "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}"
    "{% if m.content | selectattr('type', 'equalto', 'audio') | list %}<sound>{% endif %}"
    "{% for c in m.content if c.type == 'text' %}{{ c.text }}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Music Flamingo's (transformers' converter writes it) differs only in its default system turn.
MUSIC_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "You are a helpful assistant.",
    "You are Music Flamingo, a multimodal assistant for language and music. On each turn you receive an audio "
    "clip which contains music and optional text, you will receive at least one or both; use your world "
    "knowledge and reasoning to help the user with any task. Interpret the entirety of the content any input "
    "music--regardlenss of whether the user calls it audio, music, or sound.")

# The HF release's decoding defaults (its generation_config.json), on this tokenizer's ids.
RELEASE_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
THINK_LORA = lora.Spec(rank=4, alpha=8.0)


def tokenizer(vocab_size: int, music: bool = False):
  """A byte-level BPE tokenizer of exactly `vocab_size` ids: merges learnt from a few sentences of the
  prompts AF3 sees, filler tokens (never produced by encoding; each decodes as `<id>`) where the merges
  run out, then `SPECIAL_TOKENS`, so `<sound>` is id `vocab_size - 1`. eos is `<|im_end|>`. `music`:
  Music Flamingo's, `MUSIC_TOKENS` just below `<sound>` and its chat template."""
  specials = [*SPECIAL_TOKENS[:-1], *(MUSIC_TOKENS if music else []), SPECIAL_TOKENS[-1]]
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  size = vocab_size - len(specials)
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if size < len(alphabet):
    raise ValueError(f"vocab_size {vocab_size} is below the {len(alphabet) + len(specials)} ids of a "
                     "byte-level tokenizer and its special tokens")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([_CORPUS] * 20, trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet,
                                                              show_progress=False))
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  vocab.update({f"<{i}>": i for i in range(len(vocab), size)})
  tok = Tokenizer.from_str(json.dumps(spec))
  tok.add_special_tokens(specials)
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="<|im_end|>",
                                 pad_token="[PAD]",
                                 chat_template=MUSIC_CHAT_TEMPLATE if music else CHAT_TEMPLATE)


def random_params(cfg: AF3Config, seed: int = 0) -> nnx.State:
  """Every parameter of the model `cfg` describes, float32 in our layout, drawn from numpy's generator
  seeded `seed`: norm weights ~ 1 + N(0, 0.1^2), everything else (biases too) ~ N(0, 0.1^2)."""
  _, abstract, _ = abstract_model(cfg, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                                  mesh=sharding.single_device_mesh())
  rng = np.random.default_rng(seed)
  flat = {}
  for path, spec in sorted(traverse_util.flatten_dict(nnx.to_pure_dict(abstract)).items()):
    noise = 0.1 * rng.standard_normal(spec.shape, dtype=np.float32)
    flat[path] = 1 + noise if path[-1] == "scale" else noise
  return nnx.State(traverse_util.unflatten_dict(flat))


def random_adapter(params: nnx.State, spec: lora.Spec, seed: int) -> dict[tuple[str, ...], np.ndarray]:
  """LoRA weights ~ N(0, 0.1^2) for every decoder linear of `params` that `lora.TARGET` names, by our
  paths; lora_b is drawn too (peft starts it at zero, and such an adapter would change nothing)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, x in sorted(traverse_util.flatten_dict(nnx.to_pure_dict(params)).items()):
    if path[-1] == "kernel" and re.fullmatch(lora.TARGET, ".".join(path[:-1])):
      *stack, fan_in, fan_out = x.shape
      flat[(*path[:-1], "lora_a")] = 0.1 * rng.standard_normal((*stack, fan_in, spec.rank), dtype=np.float32)
      flat[(*path[:-1], "lora_b")] = 0.1 * rng.standard_normal((*stack, spec.rank, fan_out), dtype=np.float32)
  return flat


def write(dst: str | Path, *, model_type: str = "audioflamingo3", config: AF3Config | None = None, seed: int = 0,
          think: bool = False, generation: dict | None = RELEASE_SAMPLING,
          shard_bytes: int = safetensors.SHARD_BYTES) -> Path:
  """Writes a complete random checkpoint of `model_type` (one of `MODEL_TYPES`) to the new folder `dst`.

  config: the model's shape (default: `CONFIGS[model_type]`; a config with `rote` is a Music Flamingo);
  its vocabulary must hold the byte-level tokenizer, its `audio_token_id` must be the last id, and a Music
  Flamingo's audio bos and eos the two below. think: also a random think-mode LoRA in
  `think/` (`--think` merges it). generation: the decoding defaults written to `generation_config.json`
  beside eos (`<|im_end|>`, `<|endoftext|>`) and pad (default: the release's sampling settings); None
  writes no such file, so decoding is greedy and never stops before `max_new_tokens`. shard_bytes: the
  largest safetensors file (smaller gives shards and an index). The folder is written beside `dst` and
  renamed at the end; an existing `dst` is refused.
  """
  if model_type not in CONFIGS:
    raise ValueError(f"model type {model_type!r}: not one of {', '.join(MODEL_TYPES)}")
  cfg = config or CONFIGS[model_type]
  if cfg.audio_token_id != cfg.decoder.vocab_size - 1:
    raise ValueError(f"audio_token_id {cfg.audio_token_id}: the tokenizer puts <sound> at the last id, "
                     f"{cfg.decoder.vocab_size - 1}")
  music = cfg.rote is not None
  if music and (cfg.audio_bos_token_id, cfg.audio_eos_token_id) != (cfg.audio_token_id - 2, cfg.audio_token_id - 1):
    raise ValueError(f"audio bos/eos ids {cfg.audio_bos_token_id}, {cfg.audio_eos_token_id}: the tokenizer puts "
                     f"them at {cfg.audio_token_id - 2} and {cfg.audio_token_id - 1}, below <sound>")
  dst = Path(dst)
  if dst.exists():
    raise ValueError(f"{dst}: already exists; choose a new folder")
  if (ancestor := next(p for p in dst.parents if p.exists())).is_file():
    raise ValueError(f"{dst}: {ancestor} is a file, not a folder")
  tok = tokenizer(cfg.decoder.vocab_size, music)
  tmp = dst.parent / f".{dst.name}.partial"
  shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write
  tmp.mkdir(parents=True)
  (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
  params = random_params(cfg, seed)
  safetensors.save_safetensors(params, tmp, shard_bytes)
  tok.save_pretrained(tmp)
  _write_processor_config(tmp, music)
  if generation is not None:
    ids = tok.convert_tokens_to_ids
    gen = {"eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")], "pad_token_id": tok.pad_token_id, **generation}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
  if think:
    lora.save_peft(tmp / "think", random_adapter(params, THINK_LORA, seed + 1), THINK_LORA)
  tmp.rename(dst)
  return dst


def _write_processor_config(dst: Path, music: bool) -> None:
  """What transformers' `AudioFlamingo3Processor` (or `MusicFlamingoProcessor`).save_pretrained writes
  beside the tokenizer (those classes need torch): its settings and the Whisper feature extractor's, so
  `AutoProcessor` loads the folder."""
  from transformers import WhisperFeatureExtractor

  extractor = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True).to_dict()
  if music:
    config = {"audio_token": "<sound>", "audio_bos_token": MUSIC_TOKENS[0], "audio_eos_token": MUSIC_TOKENS[1],
              "feature_extractor": extractor, "max_audio_len": 1200, "processor_class": "MusicFlamingoProcessor"}
  else:
    config = {"audio_token": "<sound>", "default_transcription_prompt": "Transcribe the input speech.",
              "feature_extractor": extractor, "max_audio_len": 600, "processor_class": "AudioFlamingo3Processor"}
  (dst / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")

