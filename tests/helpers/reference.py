"""The PyTorch reference: transformers' models of the tiny shapes with random weights, the original
release layout written from one, and their logits and greedy answers."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from helpers.tiny import SEED, Tester, Tiny

try:  # the PyTorch reference; tests that need it skip without it
  import torch
  import transformers
  from safetensors.torch import load_file, save_file
except ImportError:
  torch = None


def randomize(model, seed: int) -> None:
  """Redraws every tensor as `tiny_checkpoint.random_params` draws them: weights and biases ~ N(0, 0.1),
  norm weights ~ 1 + N(0, 0.1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      noise = torch.randn(p.shape, generator=g) * 0.1
      p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)


def build_torch_model(tiny: Tiny | Tester, seed: int = SEED):
  """transformers' model of `tiny` with random weights: for a `Tiny`, read from the checkpoint
  `Tiny.write` writes; transformers' tester config is built by transformers and redrawn."""
  if isinstance(tiny, Tester):
    torch.manual_seed(seed)
    model = transformers.AudioFlamingo3ForConditionalGeneration(tiny.hf_config())
    randomize(model, seed)
    return model.eval()
  with tempfile.TemporaryDirectory() as tmp:
    return torch_model_of(tiny.write(Path(tmp) / tiny.name, seed))


def torch_model_of(folder: Path):
  """transformers' AF3 or Music Flamingo (as config.json says) holding the tensors of a checkpoint
  `Tiny.write` wrote, every one of them (strict), built from its config.json rather than by
  `from_pretrained`, which would make `save_pretrained` write the names it read instead of transformers'
  own."""
  music = json.loads((folder / "config.json").read_text())["model_type"] == "musicflamingo"
  config = (transformers.MusicFlamingoConfig if music else transformers.AudioFlamingo3Config).from_pretrained(folder)
  model_cls = (transformers.MusicFlamingoForConditionalGeneration if music
               else transformers.AudioFlamingo3ForConditionalGeneration)
  model = model_cls(config)
  model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
  return model.eval()


def write_nvidia_layout(model, dst: Path) -> None:
  """The original release layout: llm/, sound_tower/ (Whisper field names), sound_mm_projector/."""
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  cfg = model.config
  folders = {"llm": {}, "sound_tower": {}, "sound_mm_projector": {}}
  for key, value in state.items():
    if key.startswith("model.language_model."):
      folders["llm"]["model." + key.removeprefix("model.language_model.")] = value
    elif key == "lm_head.weight":
      folders["llm"][key] = value
    elif key.startswith("model.audio_tower."):
      folders["sound_tower"][key.removeprefix("model.audio_tower.")] = value
    else:
      short = key.removeprefix("model.multi_modal_projector.")
      folders["sound_mm_projector"][short.replace("linear_1", "layers.0").replace("linear_2", "layers.2")] = value
  for folder, tensors in folders.items():
    (dst / folder).mkdir(parents=True)
    save_file(tensors, dst / folder / "model.safetensors")
  cfg.text_config.to_json_file(dst / "llm" / "config.json")
  (dst / "llm" / "added_tokens.json").write_text(json.dumps({"<sound>": cfg.audio_token_id}))
  a = cfg.audio_config
  (dst / "sound_tower" / "config.json").write_text(json.dumps(dict(
      model_type="qwen2_audio_encoder", num_mel_bins=a.num_mel_bins, d_model=a.hidden_size,
      encoder_layers=a.num_hidden_layers, encoder_attention_heads=a.num_attention_heads,
      encoder_ffn_dim=a.intermediate_size, max_source_positions=a.max_source_positions,
      activation_function="gelu")))
  (dst / "sound_mm_projector" / "config.json").write_text(json.dumps({"model_type": "sound_mm_projector"}))


def torch_logits(model, ids, mask, feats=None, feats_mask=None):
  """transformers' logits; positions from the mask, as `generate` derives them (a plain forward would
  count the pads)."""
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  if feats is not None:
    kw.update(input_features=torch.tensor(feats), input_features_mask=torch.tensor(feats_mask))
  with torch.no_grad():
    return model(**kw).logits.numpy()


MAX_NEW = 16
PAD = 0


def torch_generate(model, batch, **kw) -> np.ndarray:
  """New tokens from transformers' greedy generate; positions come from the attention mask."""
  with torch.no_grad():
    out = model.generate(**{k: torch.tensor(v) for k, v in batch.items()}, do_sample=False,
                         max_new_tokens=MAX_NEW, pad_token_id=PAD, **kw)
  return out[:, batch["input_ids"].shape[1]:].numpy()
