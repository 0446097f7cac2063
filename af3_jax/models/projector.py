"""Audio adaptor: mirrors transformers' `AudioFlamingo3MultiModalProjector`.

linear_1 -> exact GELU -> linear_2, mapping encoder frames into the decoder's embedding space.
NVIDIA's release names the two linears `layers.0` and `layers.2`; `convert/` renames them.
"""

from __future__ import annotations

import jax
from flax import nnx

from af3_jax.models import layers


class Projector(nnx.Module):
  """(..., encoder width) -> (..., decoder width)."""

  def __init__(self, audio_width: int, text_width: int, *, use_bias: bool, compute_dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = layers.Linear(audio_width, text_width, axes=("embed", "mlp"), **kw)
    self.linear_2 = layers.Linear(text_width, text_width, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))
