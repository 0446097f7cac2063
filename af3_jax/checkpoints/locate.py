"""Finding upstream checkpoints: a local folder or a hub id, which layout it holds (NVIDIA's folders,
transformers' one folder, or our orbax copy), its tokenizer and think adapter, and its config."""

from __future__ import annotations

import re
from pathlib import Path

from af3_jax.checkpoints import names
from af3_jax.config import AF3Config, decoder_config, encoder_config, parse_json, read_json

ORBAX_PARAMS = "params"  # our converted checkpoints: config.json + orbax tree in this subfolder
_ORBAX_TREE = "_METADATA"  # what every finished orbax tree holds (its structure)
INDEX = "model.safetensors.index.json"
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def resolve(path_or_hub_id: str | Path) -> Path:
  """A local checkpoint folder, or a hub id resolved through huggingface_hub (local cache first)."""
  path = Path(path_or_hub_id).expanduser()
  if path.exists():
    if not path.is_dir():
      raise ValueError(f"{path}: not a checkpoint directory")
    return path
  hub_id = str(path_or_hub_id)
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
    raise ValueError(f"{hub_id}: no such checkpoint directory")
  import huggingface_hub  # only needed for hub ids

  try:
    return Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=_HUB_FILES, local_files_only=True))
  except Exception:  # not cached: fall through to a download
    pass
  try:
    return Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=_HUB_FILES))
  except Exception as e:
    raise ValueError(f"{hub_id}: not a local folder and not downloadable here ({type(e).__name__}); "
                     f"fetch it with `hf download {hub_id}` where there is network, then pass the folder") from None


def think_adapter(root: Path) -> Path:
  """The checkpoint's think-mode LoRA folder: think/ (transformers' release) or stage35/ (NVIDIA's)."""
  for name in ("think", "stage35"):
    if (root / name / "adapter_config.json").is_file():
      return root / name
  raise ValueError(f"{root}: --think needs a think/ or stage35/ adapter folder beside the weights")


def layout(root: Path) -> str:
  """'orbax' (ours), 'nvidia' (llm/ + sound_tower/ + sound_mm_projector/) or 'hf' (one folder).

  Decided by the weights really there: a `params/` folder that is not a finished orbax checkpoint (a
  user's stray folder) does not count, and orbax weights beside safetensors are an error, not a guess.
  """
  nvidia = all((root / f).is_dir() for f in names.NVIDIA_FOLDERS)
  upstream = nvidia or any(root.glob("*.safetensors")) or (root / INDEX).is_file()
  if (root / ORBAX_PARAMS / _ORBAX_TREE).is_file():
    if upstream:
      raise ValueError(f"{root}: holds both safetensors and an orbax checkpoint in {ORBAX_PARAMS}/; "
                       "keep only one of them")
    return "orbax"
  if nvidia:
    return "nvidia"
  if (root / "config.json").is_file():
    return "hf"
  raise ValueError(f"{root}: not an AF3 checkpoint (no config.json, and not the NVIDIA llm/ + sound_tower/ "
                   "+ sound_mm_projector/ layout)")


def tokenizer_dir(root: Path) -> Path:
  """Where the tokenizer files are: `llm/` in the NVIDIA layout, the root otherwise (also a bare tokenizer)."""
  return root / "llm" if all((root / f).is_dir() for f in names.NVIDIA_FOLDERS) else root


def model_type(root: Path) -> str:
  """The family of a checkpoint folder (`config.MODEL_TYPES`), from its config.json; AF3 for the NVIDIA
  layout and for a folder without one (a bare tokenizer)."""
  config = root / "config.json"
  if tokenizer_dir(root) != root or not config.is_file():
    return "audioflamingo3"
  return AF3Config.from_json(config).model_type


def read_config(root: Path) -> AF3Config:
  if layout(root) != "nvidia":
    return AF3Config.from_json(root / "config.json")
  return AF3Config(encoder=parse_json(root / "sound_tower" / "config.json", encoder_config),
                   decoder=parse_json(root / "llm" / "config.json", decoder_config),
                   audio_token_id=_sound_token_id(root / "llm"))


def _sound_token_id(tok_dir: Path) -> int:
  """The `<sound>` id from the NVIDIA tokenizer files (151669 in the release)."""
  added = tok_dir / "added_tokens.json"
  if added.is_file() and isinstance(sound := read_json(added).get("<sound>"), int):
    return sound
  full = tok_dir / "tokenizer.json"
  tokens = read_json(full).get("added_tokens") if full.is_file() else None
  for tok in tokens if isinstance(tokens, list) else []:
    if isinstance(tok, dict) and tok.get("content") == "<sound>" and isinstance(tok.get("id"), int):
      return tok["id"]
  raise ValueError(f"{tok_dir}: no <sound> token in added_tokens.json or tokenizer.json")
