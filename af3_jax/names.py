"""Checkpoint key names: every upstream layout <-> our parameter paths, and the tensor transforms.

Our parameter paths are transformers' module-tree names without `model.` (docs/architecture.md#parameter-names):
only the leaf changes (`weight` -> `kernel`, transposed, for linears and convs; `scale` for norms;
`embedding` for embeddings) and `layers.{i}` becomes index i of a stacked leading axis.

Layouts (docs/upstream.md#checkpoint-layouts):
  hf      what transformers 5.x `save_pretrained` writes (`language_model.model.*`, ...) and the
          module-tree names (`model.language_model.*`, `lm_head.weight`); one folder of safetensors.
  nvidia  the original release: `llm/` (Qwen2ForCausalLM), `sound_tower/` (unprefixed encoder keys),
          `sound_mm_projector/` (`layers.0` / `layers.2`), each a folder of safetensors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# (checkpoint prefix, canonical prefix): the first match wins, so longer prefixes come first.
HF_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("audio_tower.", "audio_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)

NVIDIA_FOLDERS = ("llm", "sound_tower", "sound_mm_projector")
NVIDIA_PREFIXES = {
    "llm": (("model.", "language_model."), ("lm_head.", "lm_head.")),
    "sound_tower": (("", "audio_tower."),),
    "sound_mm_projector": (("layers.0.", "multi_modal_projector.linear_1."),
                           ("layers.2.", "multi_modal_projector.linear_2.")),
}

# The per-output-channel scale beside an int8 kernel (`layers.Linear.quantize_int8`): made when the
# kernel is quantised at load, so no checkpoint holds it.
INT8_SCALE = "kernel_scale"

_NORMS = re.compile(r"(norm|layernorm|layer_norm)$")
_EMBEDDINGS = ("embed_tokens", "embed_positions")
_CONVS = ("conv1", "conv2")
_STACKED = re.compile(r"^(?P<stack>.+?)\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")


def canonical(key: str, prefixes: tuple[tuple[str, str], ...]) -> str | None:
  """A checkpoint key in canonical (module-tree minus `model.`) form, or None if no prefix matches."""
  for old, new in prefixes:
    if key.startswith(old):
      return new + key[len(old):]
  return None


def _leaf(module: str, leaf: str) -> tuple[str, str]:
  """(our leaf name, transform) for torch leaf `leaf` of a module whose last name is `module`."""
  if leaf == "bias":
    return "bias", "none"
  if leaf != "weight":
    raise KeyError(leaf)
  if _NORMS.search(module):
    return "scale", "none"
  if module in _EMBEDDINGS:
    return "embedding", "none"
  if module in _CONVS:
    return "kernel", "conv"
  return "kernel", "linear"


def param_path(key: str) -> tuple[tuple[str, ...], int | None, str]:
  """Canonical key -> (our parameter path, layer index or None, transform name)."""
  m = _STACKED.match(key)
  layer = int(m["index"]) if m else None
  names = (m["stack"].split(".") + ["layers"] + m["rest"].split(".")) if m else key.split(".")
  leaf, transform = _leaf(names[-2], names[-1])
  return (*names[:-1], leaf), layer, transform


# `Model.fused`'s joined projections (qwen2.py), an inference layout no checkpoint holds.
FUSED = frozenset({"qkv_proj", "gate_up_proj"})


def hf_key(path: tuple[str, ...], layer: int | None) -> str:
  """Our parameter path (and layer) -> the canonical key; the inverse of `param_path`."""
  if FUSED.intersection(path):
    raise ValueError(f"{'.'.join(path)} is a fused inference weight (Model.fused) with no checkpoint name: "
                     "export, train or adapt the model as loaded")
  names = list(path)
  if layer is not None:
    i = names.index("layers")
    names.insert(i + 1, str(layer))
  names[-1] = "bias" if names[-1] == "bias" else "weight"
  return ".".join(names)


def torch_to_ours(x: np.ndarray, transform: str) -> np.ndarray:
  """A tensor in torch's layout -> ours: linear (out, in) -> (in, out), conv (out, in, k) -> (k, in, out)."""
  if transform == "linear":
    return x.T
  if transform == "conv":
    return x.transpose(2, 1, 0)
  return x


def ours_to_torch(x: np.ndarray, transform: str) -> np.ndarray:
  """Our layout -> torch's, the inverse of `torch_to_ours` (each transpose is its own inverse)."""
  return torch_to_ours(x, transform)


def layers_of(path: tuple[str, ...], shape: tuple[int, ...]) -> Sequence[int | None]:
  """The checkpoint layers one of our parameters holds: each index of its leading axis when its path
  is in a layer stack (`layers`), else [None] (one unstacked tensor)."""
  return range(shape[0]) if "layers" in path else [None]

# Adapter and extra-tensor keys name modules of whatever peft wrapped: the transformers model, the
# NVIDIA llava model (folder names as attribute prefixes), or the bare Qwen2ForCausalLM.
ADAPTER_PREFIXES = (
    *HF_PREFIXES,
    *((f"{folder}.{old}", new) for folder, pairs in NVIDIA_PREFIXES.items() for old, new in pairs),
    *NVIDIA_PREFIXES["llm"],
)


def module_tree_key(canon: str) -> str:
  """Canonical key -> transformers' module-tree name (`model.language_model.*`, `lm_head.weight`)."""
  return canon if canon.startswith("lm_head.") else "model." + canon
