"""Audio Flamingo 3 in JAX / Flax NNX."""

from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig
from af3_jax.pretrained import Model, from_pretrained

__all__ = ["AF3Config", "DecoderConfig", "EncoderConfig", "Model", "from_pretrained"]
