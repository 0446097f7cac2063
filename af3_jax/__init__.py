"""Audio Flamingo 3 in JAX / Flax NNX."""

import importlib

from af3_jax.checkpoints.pretrained import Model, from_pretrained
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig
from af3_jax.data.manifest import read_manifest
from af3_jax.inference.decode import generate, generate_stream

# Audio decoding pulls in librosa and soundfile, which model-only users (benchmarks, the GPU image)
# may lack: these names load on first use.
_LAZY = {"Processor": "af3_jax.data.processor", "load_audio": "af3_jax.audio.loading"}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'af3_jax' has no attribute {name!r}")


__all__ = ["AF3Config", "DecoderConfig", "EncoderConfig", "Model", "Processor", "from_pretrained", "generate",
           "generate_stream", "load_audio", "read_manifest"]
