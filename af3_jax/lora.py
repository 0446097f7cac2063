"""LoRA in one place: which linears get it, adding it for training, the one merge into the weights, and
peft's adapter files both ways (the released think-mode adapters `think/` and `stage35/` read, a LoRA
run's adapter written).

Our layout: an adapted `layers.Linear` holds lora_a (in, r) and lora_b (r, out), with a leading layer
axis in a stack. peft stores `lora_A.weight` = lora_a.T (r, in) and `lora_B.weight` = lora_b.T (out, r)
under `base_model.model.<module-tree path>`. Merged: W' = W + scale * lora_a @ lora_b, with scale =
alpha / r (alpha / sqrt(r) with rsLoRA), as peft's `merge_and_unload`, in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from af3_jax import names
from af3_jax.config import read_json
from af3_jax.models import layers
from af3_jax.safetensors_file import SafetensorsFile

# Every decoder linear, not lm_head (docs/upstream.md#think-mode-and-af3-chat: NVIDIA's `find_all_linear_names` on the LLM).
TARGET = r"language_model\.layers\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclasses.dataclass(frozen=True)
class Spec:
  """A LoRA's shape: rank r and alpha (scale alpha / r)."""

  rank: int
  alpha: float


def add(module: nnx.Module, spec: Spec, key: jax.Array, target: str = TARGET) -> list[str]:
  """Adds LoRA (`layers.Linear.add_lora`) to every Linear whose dotted path fully matches `target`.

  Stacked layers get stacked LoRA weights. Base weights keep their paths and values (lora_b = 0).
  Returns the dotted paths adapted; raises if none matched.
  """
  pattern = re.compile(target)
  adapted = []
  for path, node in nnx.iter_graph(module):
    name = ".".join(map(str, path))
    if isinstance(node, layers.Linear) and pattern.fullmatch(name):
      node.add_lora(spec.rank, spec.alpha, jax.random.fold_in(key, len(adapted)))
      adapted.append(name)
  if not adapted:
    raise ValueError(f"no Linear matches the LoRA target {target!r}")
  return adapted


def merged_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
  """kernel + scale * lora_a @ lora_b in float32, back in the kernel's dtype (leading layer axes allowed)."""
  delta = scale * jnp.einsum("...ir,...ro->...io", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge_into(module: nnx.Module) -> None:
  """Folds every Linear's LoRA into its kernel and removes the LoRA weights (in place)."""
  for _, node in nnx.iter_graph(module):
    if isinstance(node, layers.Linear) and node.lora_a is not None:
      node.kernel[...] = merged_kernel(node.kernel[...], node.lora_a[...], node.lora_b[...], node.lora_scale)
      node.lora_a, node.lora_b, node.lora_scale = nnx.data(None), nnx.data(None), None


def _peft_module(path: tuple[str, ...], layer: int | None) -> str:
  """Our LoRA parameter's path (…, lora_a | lora_b) and layer -> the adapted module's peft name."""
  key = names.module_tree_key(names.hf_key((*path[:-1], "kernel"), layer))
  return _PEFT_PREFIX + key.removesuffix(".weight")


def _resolve(key: str, params: dict):
  """(path, layer, transform) of the parameter a peft or upstream key names, in any layout, or None.

  Keys may carry peft's `base_model.model.` and NVIDIA's extra leading `model.`; the first reading
  that names a parameter of this model wins.
  """
  key = key.removeprefix(_PEFT_PREFIX)
  for candidate in (key, key.removeprefix("model.")):
    canon = names.canonical(candidate, names.ADAPTER_PREFIXES)
    try:
      found = names.param_path(canon) if canon else None
    except KeyError:
      found = None
    if found and found[0] in params:
      return found
  return None


def write_peft(dst: Path, params: nnx.State, spec: Spec) -> None:
  """Writes the LoRA weights in `params` (a LoRA run's trainable state) as a peft adapter folder
  (`save_peft`)."""
  # Every process gathers (params may be sharded over processes); process 0 alone writes.
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  flat = {k: np.asarray(x, np.float32) for k, x in multihost_utils.process_allgather(flat, tiled=True).items()}
  if jax.process_index() == 0:
    save_peft(dst, flat, spec)


def save_peft(dst: Path, flat: dict[tuple[str, ...], np.ndarray], spec: Spec) -> None:
  """LoRA weights by our paths (`(..., lora_a | lora_b)`, stacked layers first) as a peft adapter folder:
  `adapter_config.json` and `adapter_model.safetensors`."""
  tensors = {}
  for path, x in flat.items():
    which = {"lora_a": "A", "lora_b": "B"}[path[-1]]
    for layer in names.layers_of(path, x.shape):
      value = x if layer is None else x[layer]
      tensors[f"{_peft_module(path, layer)}.lora_{which}.weight"] = np.ascontiguousarray(value.T)
  dst.mkdir(parents=True)
  save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
            "lora_dropout": 0.0, "bias": "none", "target_modules": ".*" + TARGET, "use_rslora": False}
  (dst / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _peft_scale(config: dict) -> float:
  if config.get("rank_pattern") or config.get("alpha_pattern"):
    raise ValueError("adapters with per-module rank_pattern/alpha_pattern are not supported")
  r, alpha = config["r"], config.get("lora_alpha", config["r"])
  return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@functools.partial(jax.jit, donate_argnums=0)
def _merge_layer(kernel, layer, lora_a, lora_b, scale):
  """`merged_kernel` on one layer of a stacked kernel (or on a plain 2-D kernel), on the device."""
  if kernel.ndim == 2:
    return merged_kernel(kernel, lora_a, lora_b, scale)
  row = jax.lax.dynamic_index_in_dim(kernel, layer, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(kernel, merged_kernel(row, lora_a, lora_b, scale), layer, 0)


def merge_peft(state: nnx.State, adapter_dir: str | Path) -> nnx.State:
  """Merges the peft adapter in `adapter_dir` into `state` (in place, one layer at a time) and returns it.

  Full tensors shipped beside the adapter (`non_lora_trainables.bin`) then overwrite base weights by the
  same name table as checkpoints; that file is a pickle, so it is read with `torch.load(weights_only=True)`
  and only when torch is installed.
  """
  adapter_dir = Path(adapter_dir)
  if not (adapter_dir / "adapter_config.json").is_file():
    raise ValueError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
  scale = _peft_scale(read_json(adapter_dir / "adapter_config.json"))
  weights_file = adapter_dir / "adapter_model.safetensors"
  if not weights_file.is_file():
    raise ValueError(f"{weights_file}: missing (only safetensors adapters are read; pickled ones never are)")
  params = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  pairs: dict[tuple, dict[str, np.ndarray]] = {}
  f = SafetensorsFile(weights_file)
  for key in f.keys():
    m = _PEFT_KEY.match(key)
    found = _resolve(m["module"] + ".weight", params) if m else None
    if found is None or found[2] != "linear":
      raise ValueError(f"{weights_file}: adapter key {key} names no linear layer of this model")
    pairs.setdefault(found[:2], {})[m["which"]] = f.get(key)
  for (path, layer), ab in pairs.items():
    if set(ab) != {"A", "B"}:
      raise ValueError(f"{weights_file}: {names.hf_key(path, layer)} needs both lora_A and lora_B")
    params[path] = _merge_layer(params[path], 0 if layer is None else layer, ab["A"].T, ab["B"].T, scale)
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
    x = names.torch_to_ours(value.float().numpy(), transform)
    old = params[path]
    new = old.at[layer].set(x.astype(old.dtype)) if layer is not None else jnp.asarray(x, old.dtype)
    params[path] = jax.device_put(new, old.sharding)
