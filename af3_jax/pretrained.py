"""`from_pretrained` and `Model`, the public handle on a loaded Audio Flamingo 3 (`init_random`: one
with random weights, for benchmarks)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af3_jax import sharding, weights
from af3_jax.adapter import merge_adapter
from af3_jax.config import AF3Config
from af3_jax.models import layers, whisper
from af3_jax.models.af3 import AudioFlamingo3, audio_positions


def abstract_model(cfg: AF3Config, *, param_dtype, dtype, mesh: jax.sharding.Mesh, rules=sharding.LOGICAL_RULES,
                   remat: str = "none"):
  """(graphdef, abstract state, shardings) of the model, without allocating any parameter. `remat`
  names the layer stacks' rematerialisation policy (`layers.REMAT_POLICIES`): training memory."""
  module = nnx.eval_shape(lambda: AudioFlamingo3(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                                 rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(module)
  return graphdef, abstract_state, sharding.state_shardings(abstract_state, mesh, rules)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
  return nnx.merge(graphdef, state)(**batch)


class Model:
  """A loaded AF3: its config, the NNX module split into (graphdef, state), and the mesh it lives on.

  Calling it returns logits `(batch, seq, vocab)` for transformers-shaped inputs, jitted (one compile
  per input shape). Inputs are checked on the host first, so mistakes are clear errors, not garbage.
  """

  def __init__(self, config: AF3Config, graphdef: nnx.GraphDef, state: nnx.State, mesh: jax.sharding.Mesh,
               path: Path | None = None):
    self.config = config
    self.graphdef = graphdef
    self.state = state
    self.mesh = mesh
    self.path = path

  @property
  def module(self) -> AudioFlamingo3:
    """The NNX module (shares the arrays of `state`)."""
    return nnx.merge(self.graphdef, self.state)

  def __call__(self, *, input_ids, attention_mask=None, input_features=None, input_features_mask=None,
               audio_embed_mask=None, position_ids=None) -> jax.Array:
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, input_features=input_features,
                 input_features_mask=input_features_mask, audio_embed_mask=audio_embed_mask,
                 position_ids=position_ids)
    batch = {k: v for k, v in batch.items() if v is not None}
    check_inputs(self.config, **batch)
    with jax.set_mesh(self.mesh):
      return _forward(self.graphdef, self.state, batch)


def check_inputs(cfg: AF3Config, *, input_ids, attention_mask=None, input_features=None,
                 input_features_mask=None, audio_embed_mask=None, position_ids=None) -> None:
  """Raises ValueError for inputs the model would silently get wrong (shapes, audio token counts)."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be integer (batch, seq), got {ids.dtype} {ids.shape}")
  for name, x in (("attention_mask", attention_mask), ("position_ids", position_ids)):
    if x is not None and np.shape(x) != ids.shape:
      raise ValueError(f"{name} must have the shape of input_ids {ids.shape}, got {np.shape(x)}")
  if input_features is None:
    if input_features_mask is not None or audio_embed_mask is not None:
      raise ValueError("input_features_mask / audio_embed_mask given without input_features")
    return
  e = cfg.encoder
  windows = np.shape(input_features)[0]
  frames = 2 * e.max_source_positions
  if np.shape(input_features) != (windows, e.num_mel_bins, frames):
    raise ValueError(f"input_features must be (windows, {e.num_mel_bins}, {frames}), got {np.shape(input_features)}")
  if input_features_mask is None or np.shape(input_features_mask) != (windows, frames):
    raise ValueError(f"input_features_mask must be given with shape ({windows}, {frames})")
  if audio_embed_mask is None:
    n_frames = int(np.maximum(whisper.pooled_lengths(np.asarray(input_features_mask).astype(np.int64).sum(-1)), 0).sum())
  elif np.shape(audio_embed_mask) != (windows, frames // 4):
    raise ValueError(f"audio_embed_mask must be ({windows}, {frames // 4}), got {np.shape(audio_embed_mask)}")
  else:
    n_frames = int(np.asarray(audio_embed_mask).astype(bool).sum())
  mask = None if attention_mask is None else np.asarray(attention_mask)
  n_tokens = int(audio_positions(ids, mask, cfg.audio_token_id).sum())
  if n_tokens != n_frames:
    raise ValueError(f"input_ids hold {n_tokens} <sound> tokens (id {cfg.audio_token_id}, padding not "
                     f"counted) but the audio gives {n_frames} frames; they must be equal")


def from_pretrained(path_or_hub_id: str | Path, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None, *,
                    compute_dtype=None, adapter: str | Path | None = None, remat: str = "none") -> Model:
  """Loads AF3 from a local folder or hub id: any upstream safetensors layout, or our orbax copy.

  dtype: parameter dtype; compute_dtype: activation dtype (defaults to dtype). With `mesh`, parameters
  are born sharded by the logical rules in `sharding.py`; without, they live on the first device.
  adapter: a PEFT LoRA folder (think mode: the checkpoint's `think/` or `stage35/`), merged on load.
  remat: the layer stacks' rematerialisation policy for training ("none" for inference), by name.
  """
  if remat not in layers.REMAT_POLICIES:
    raise ValueError(f"remat must be one of {sorted(layers.REMAT_POLICIES)}, got {remat!r}")
  root = weights.resolve(path_or_hub_id)
  cfg = weights.read_config(root)
  mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  graphdef, abstract_state, shardings = abstract_model(
      cfg, param_dtype=dtype, dtype=compute_dtype or dtype, mesh=mesh, remat=remat)
  load = weights.load_orbax if weights.layout(root) == "orbax" else weights.load_safetensors
  state = load(root, abstract_state, shardings)
  if adapter is not None:
    state = merge_adapter(state, adapter)
  return Model(cfg, graphdef, state, mesh, root)


def init_random(cfg: AF3Config, *, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> Model:
  """A Model with random weights (our layers' init, in `dtype` for parameters and compute), for benchmarks.

  The constructor runs inside `jax.jit` with the logical shardings as `out_shardings`, so every
  parameter is born on its devices, sharded; the full model never exists on the host or on one device
  unsharded. Without `mesh`, everything lives on the first device. The Model's `path` is None, so
  generation has no eos unless one is passed.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  graphdef, _, shardings = abstract_model(cfg, param_dtype=dtype, dtype=dtype, mesh=mesh)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init_fn() -> nnx.State:
    return nnx.split(AudioFlamingo3(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)))[1]

  with jax.set_mesh(mesh):
    return Model(cfg, graphdef, init_fn(), mesh)
