"""Audio Flamingo 3 in JAX / Flax NNX."""

from af3_jax.audio import load_audio
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig
from af3_jax.data.manifest import read_manifest
from af3_jax.decode import generate, generate_stream
from af3_jax.pretrained import Model, from_pretrained
from af3_jax.processor import Processor

__all__ = ["AF3Config", "DecoderConfig", "EncoderConfig", "Model", "Processor", "from_pretrained", "generate",
           "generate_stream", "load_audio", "read_manifest"]
