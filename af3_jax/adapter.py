"""PEFT LoRA adapters (think mode: the released `think/` and `stage35/` folders) merged into the weights.

W' = W + scale * B @ A for every adapted linear (scale = lora_alpha / r, or / sqrt(r) with rsLoRA), as
peft's `merge_and_unload` does; the merge runs on the device, one layer at a time, in float32. Full
tensors shipped beside the adapter (`non_lora_trainables.bin`) then overwrite base weights by the same
name table as checkpoints; that file is a pickle, so it is read with `torch.load(weights_only=True)`
and only when torch is installed.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from af3_jax.config import read_json
from af3_jax.weights import SafetensorsFile
from convert import names

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _resolve(key: str, params: dict):
  """(path, layer, transform) of the parameter an adapter key names, in any upstream layout, or None.

  Keys may carry peft's `base_model.model.` and NVIDIA's extra leading `model.`; the first reading
  that names a parameter of this model wins.
  """
  key = key.removeprefix("base_model.model.")
  for candidate in (key, key.removeprefix("model.")):
    canon = names.canonical(candidate, names.ADAPTER_PREFIXES)
    try:
      found = names.param_path(canon) if canon else None
    except KeyError:
      found = None
    if found and found[0] in params:
      return found
  return None


def _scale(config: dict) -> float:
  if config.get("rank_pattern") or config.get("alpha_pattern"):
    raise ValueError("adapters with per-module rank_pattern/alpha_pattern are not supported")
  r, alpha = config["r"], config.get("lora_alpha", config["r"])
  return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@functools.partial(jax.jit, donate_argnums=0)
def _merge_one(kernel, layer, a, b, scale):
  """kernel[(layer)] += scale * (B @ A)^T: our kernels are (in, out), torch's weights (out, in)."""
  delta = scale * (a.astype(jnp.float32).T @ b.astype(jnp.float32).T)
  if kernel.ndim == 2:
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  row = jax.lax.dynamic_index_in_dim(kernel, layer, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(kernel, (row.astype(jnp.float32) + delta).astype(kernel.dtype),
                                             layer, 0)


def merge_adapter(state: nnx.State, adapter_dir: str | Path) -> nnx.State:
  """Merges the adapter in `adapter_dir` into `state` (in place) and returns it."""
  adapter_dir = Path(adapter_dir)
  if not (adapter_dir / "adapter_config.json").is_file():
    raise ValueError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
  scale = _scale(read_json(adapter_dir / "adapter_config.json"))
  weights_file = adapter_dir / "adapter_model.safetensors"
  if not weights_file.is_file():
    raise ValueError(f"{weights_file}: missing (only safetensors adapters are read; pickled ones never are)")
  params = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  pairs: dict[tuple, dict[str, np.ndarray]] = {}
  f = SafetensorsFile(weights_file)
  for key in f.keys():
    m = _LORA_KEY.match(key)
    found = _resolve(m["module"] + ".weight", params) if m else None
    if found is None or found[2] != "linear":
      raise ValueError(f"{weights_file}: adapter key {key} names no linear layer of this model")
    pairs.setdefault(found[:2], {})[m["which"]] = f.get(key)
  for (path, layer), ab in pairs.items():
    if set(ab) != {"A", "B"}:
      raise ValueError(f"{weights_file}: {names.hf_key(path, layer)} needs both lora_A and lora_B")
    params[path] = _merge_one(params[path], 0 if layer is None else layer, ab["A"], ab["B"], scale)
  _overwrite_full_tensors(params, adapter_dir / "non_lora_trainables.bin")
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params))
  return state


def _overwrite_full_tensors(params: dict, file: Path) -> None:
  if not file.is_file():
    return
  try:
    import torch
  except ImportError:
    raise ValueError(f"{file}: is a PyTorch pickle; install torch to read it (it is read with "
                     "weights_only=True), or remove it to use the adapter alone") from None
  tensors = torch.load(file, map_location="cpu", weights_only=True)
  for key, value in tensors.items():
    found = _resolve(key, params)
    if found is None:
      raise ValueError(f"{file}: key {key} matches no parameter of this model")
    path, layer, transform = found
    x = names.to_ours(value.float().numpy(), transform)
    old = params[path]
    new = old.at[layer].set(x.astype(old.dtype)) if layer is not None else jnp.asarray(x, old.dtype)
    params[path] = jax.device_put(new, old.sharding)
