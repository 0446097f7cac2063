"""`from_pretrained` and `Model`, the public handle on a loaded Audio Flamingo 3 (`init_random`: one
with random weights, for benchmarks)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af3_jax import sharding
from af3_jax.checkpoints import locate, lora, orbax, quantization, safetensors
from af3_jax.config import AF3Config, read_json
from af3_jax.generation import GenerationConfig
from af3_jax.models import layers, whisper
from af3_jax.models.af3 import AudioFlamingo3, audio_positions


def abstract_model(cfg: AF3Config, *, param_dtype, compute_dtype, mesh: jax.sharding.Mesh,
                   rules=sharding.LOGICAL_RULES, remat: str | None = None, quantize: str | None = None,
                   fused: bool = False):
  """(graphdef, abstract state, shardings) of the model, without allocating any parameter. `remat`:
  None for inference (unrolled layer stacks), or training's rematerialisation policy by name
  (`layers.REMAT_POLICIES`; rolled stacks, as `layers.scan` says).
  quantize: "int8" gives the decoder's linears int8 kernels and their scales (`quantization`).
  fused: the decoder's projections joined as `Model.fused` joins them (to compile its programs ahead)."""
  def build():
    module = _build(cfg, param_dtype, compute_dtype, remat, quantize, seed=0)
    if fused:
      module.language_model.fuse()
    return module

  graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
  return graphdef, abstract_state, sharding.state_shardings(abstract_state, mesh, rules)


def _build(cfg: AF3Config, param_dtype, compute_dtype, remat: str | None, quantize: str | None,
           seed: int) -> AudioFlamingo3:
  module = AudioFlamingo3(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, remat=remat,
                          rngs=nnx.Rngs(seed))
  return quantization.quantize_module(module) if quantization.mode(quantize) else module


@functools.partial(jax.jit, static_argnums=0, compiler_options=layers.INFERENCE_COMPILER_OPTIONS)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
  return nnx.merge(graphdef, state)(**batch)


class Model:
  """A loaded AF3: its config, the NNX module split into (graphdef, state), the mesh it lives on, and
  its generation defaults (read once at load; `generate`'s arguments override them).

  Calling it returns logits `(batch, seq, vocab)` for transformers-shaped inputs, jitted (one compile
  per input shape). Inputs are checked on the host first, so mistakes are clear errors, not garbage.
  """

  def __init__(self, config: AF3Config, graphdef: nnx.GraphDef, state: nnx.State, mesh: jax.sharding.Mesh,
               path: Path | None = None, generation: GenerationConfig = GenerationConfig()):
    self.config = config
    self.graphdef = graphdef
    self.state = state
    self.mesh = mesh
    self.path = path
    self.generation = generation

  def module(self) -> AudioFlamingo3:
    """A new NNX module over the arrays of `state` (they are shared, not copied)."""
    return nnx.merge(self.graphdef, self.state)

  def fused(self) -> Model:
    """This model for inference with each decoder layer's q/k/v and gate/up projections as one matmul
    each (`qwen2.Decoder.fuse`): the same outputs from fewer, wider matmuls; int8 kernels fuse with
    their scales. The fused weights are new arrays while this model keeps its own (about half the
    weights' memory again until it is dropped), and they have no checkpoint names: train, add LoRA and
    export the model as loaded."""
    module = self.module()
    with jax.set_mesh(self.mesh):
      module.language_model.fuse()
      graphdef, state = nnx.split(module)
      state = jax.device_put(state, sharding.state_shardings(state, self.mesh))
    return Model(self.config, graphdef, state, self.mesh, self.path, self.generation)

  def __call__(self, *, input_ids, attention_mask=None, input_features=None, input_features_mask=None,
               audio_embed_mask=None, position_ids=None) -> jax.Array:
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, input_features=input_features,
                 input_features_mask=input_features_mask, audio_embed_mask=audio_embed_mask,
                 position_ids=position_ids)
    batch = {k: v for k, v in batch.items() if v is not None}
    check_inputs(self.config, batch)
    with jax.set_mesh(self.mesh):
      return _forward(self.graphdef, self.state, batch)


AUDIO_INPUTS = ("input_features", "input_features_mask", "audio_embed_mask")


def check_inputs(cfg: AF3Config, inputs: Mapping[str, Any], *, prompts: bool = False) -> dict[str, np.ndarray]:
  """The one check of transformers-named inputs, which every entry point calls (the forward, `generate`,
  `generate_stream`, the engine's requests): numpy copies of those given (None dropped). Raises
  ValueError for inputs the model would silently get wrong (unknown names, shapes, audio token counts)
  and, for `prompts` (rows that generation continues from their last column, as transformers does),
  position_ids (the mask gives positions) and an attention_mask that is not left padding or leaves a
  row without a token."""
  names = {"input_ids", "attention_mask", *AUDIO_INPUTS} | (set() if prompts else {"position_ids"})
  inputs = {k: np.asarray(v) for k, v in inputs.items() if v is not None}
  unknown = set(inputs) - names
  if unknown or "input_ids" not in inputs:
    raise ValueError(f"unknown batch entries {sorted(unknown)}: the inputs are input_ids and optionally "
                     f"{', '.join(sorted(names - {'input_ids'}))}" if unknown else "input_ids must be given")
  ids = inputs["input_ids"]
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be integer (batch, seq), got {ids.dtype} {ids.shape}")
  for name in ("attention_mask", "position_ids"):
    if name in inputs and inputs[name].shape != ids.shape:
      raise ValueError(f"{name} must have the shape of input_ids {ids.shape}, got {inputs[name].shape}")
  mask = inputs.get("attention_mask")
  if prompts:
    if ids.shape[1] == 0:
      raise ValueError("the prompt is empty")
    left_padded = lambda m: np.isin(m, (0, 1)).all() and (np.diff(m, axis=1) >= 0).all() and m[:, -1].all()
    if mask is not None and not left_padded(mask):
      raise ValueError("attention_mask must be left padding (zeros, then ones) with a token in every row")
  if "input_features" not in inputs:
    if set(AUDIO_INPUTS) & set(inputs):
      raise ValueError("input_features_mask / audio_embed_mask given without input_features")
    return inputs
  e = cfg.encoder
  features, features_mask = inputs["input_features"], inputs.get("input_features_mask")
  windows = features.shape[0] if features.ndim else 0
  frames, tokens = e.mel_frames, whisper.tokens_per_window(e)
  if features.shape != (windows, e.num_mel_bins, frames):
    raise ValueError(f"input_features must be (windows, {e.num_mel_bins}, {frames}), got {features.shape}")
  if features_mask is None or features_mask.shape != (windows, frames):
    raise ValueError(f"input_features_mask must be given with shape ({windows}, {frames})")
  embed_mask = inputs.get("audio_embed_mask")
  if embed_mask is None:
    n_frames = int(np.maximum(whisper.pooled_lengths(features_mask.astype(np.int64).sum(-1)), 0).sum())
  elif embed_mask.shape != (windows, tokens):
    raise ValueError(f"audio_embed_mask must be ({windows}, {tokens}), got {embed_mask.shape}")
  else:
    n_frames = int(embed_mask.astype(bool).sum())
  n_tokens = int(audio_positions(ids, mask, cfg.audio_token_id).sum())
  if n_tokens != n_frames:
    raise ValueError(f"input_ids hold {n_tokens} <sound> tokens (id {cfg.audio_token_id}, padding not "
                     f"counted) but the audio gives {n_frames} frames; they must be equal")
  return inputs


def from_pretrained(path_or_hub_id: str | Path, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None, *,
                    compute_dtype=None, adapter: str | Path | None = None, remat: str | None = None,
                    quantize: str | None = None) -> Model:
  """Loads AF3 from a local folder or hub id: any upstream safetensors layout, or our orbax copy.

  dtype: the parameters' dtype; compute_dtype: activations' (defaults to dtype). With `mesh`, parameters
  are born sharded by the logical rules in `sharding.py`; without, they live on the first device.
  adapter: a PEFT LoRA folder (think mode: the checkpoint's `think/` or `stage35/`), merged on load.
  remat: None for inference: the layer stacks run unrolled, each layer reading its weights at a static
  index (`layers.scan`). For training, a rematerialisation policy by name (`layers.REMAT_POLICIES`,
  "none" keeping every activation): the stacks run as a `lax.scan`, compiled once.
  quantize: None or "none" (keep `dtype`), or "int8": the decoder's linears become int8 weights with a
  scale per output channel, for decoding (`quantization`); not for training.
  """
  if remat is not None and remat not in layers.REMAT_POLICIES:
    raise ValueError(f"remat must be None (inference) or one of {sorted(layers.REMAT_POLICIES)}, got {remat!r}")
  quantize = quantization.mode(quantize)
  if quantize and remat is not None:
    raise ValueError(f"quantize={quantize!r} is for decoding; training (remat={remat!r}) needs the float weights")
  root = locate.resolve(path_or_hub_id)
  cfg = locate.read_config(root)
  generation = read_generation_config(root)
  mesh = mesh if mesh is not None else sharding.single_device_mesh()
  kw = dict(param_dtype=dtype, compute_dtype=compute_dtype or dtype, mesh=mesh, remat=remat)
  graphdef, abstract_state, shardings = abstract_model(cfg, **kw, quantize=quantize)
  load = orbax.load_orbax if locate.layout(root) == "orbax" else safetensors.load_safetensors
  # Safetensors are quantised on the host as they stream in, so the float weights never reach the device.
  # An orbax copy restores whole, and an adapter merges into float weights: those load the float model
  # onto the device first and quantise it there.
  streamed = not quantize or (load is safetensors.load_safetensors and adapter is None)
  if streamed:
    state = load(root, abstract_state, shardings)
  else:
    _, float_state, float_shardings = abstract_model(cfg, **kw)
    state = load(root, float_state, float_shardings)
  if adapter is not None:
    state = lora.merge_peft(state, adapter)
  if not streamed:
    state = quantization.quantize_state(state, abstract_state, shardings)
  return Model(cfg, graphdef, state, mesh, root, generation)


def read_generation_config(root: Path) -> GenerationConfig:
  """A checkpoint folder's generation defaults: `generation_config.json` (none: transformers' defaults),
  eos from `config.json` when that file names none (top level for a plain Qwen2 config, `text_config`
  for transformers' AF3)."""
  gen_file = root / "generation_config.json"
  gen = read_json(gen_file) if gen_file.is_file() else {}
  config = read_json(locate.tokenizer_dir(root) / "config.json")
  config_eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
  try:
    return GenerationConfig.from_dict(gen, config_eos)
  except ValueError as e:
    raise ValueError(f"{gen_file}: {e}") from None


def init_random(cfg: AF3Config, *, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                quantize: str | None = None, remat: str | None = None) -> Model:
  """A Model with random weights (our layers' init, in `dtype` for parameters and compute), for benchmarks;
  `quantize` and `remat` as in `from_pretrained`.

  The constructor runs inside `jax.jit` with the logical shardings as `out_shardings`, so every
  parameter is born on its devices, sharded; the full model never exists on the host or on one device
  unsharded. Without `mesh`, everything lives on the first device. The Model has no path and no
  generation defaults: generation has no eos unless one is passed.
  """
  mesh = mesh if mesh is not None else sharding.single_device_mesh()
  graphdef, _, shardings = abstract_model(cfg, param_dtype=dtype, compute_dtype=dtype, mesh=mesh, quantize=quantize,
                                          remat=remat)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init_fn() -> nnx.State:
    return nnx.split(_build(cfg, dtype, dtype, remat, quantize, seed))[1]

  with jax.set_mesh(mesh):
    return Model(cfg, graphdef, init_fn(), mesh)
