"""The plumbing of a training run around `train_lib`'s step: processes and mesh, the model and its
trainable split for a stage, host batches to global arrays, and the finished model written out."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from af3_jax import train_lib, weights
from af3_jax.models import layers
from af3_jax.pretrained import Model
from convert import names


def initialize_distributed() -> None:
  """Joins a multi-process run described by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (set them in every process); does nothing for a single process. Must run first."""
  n = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  if n > 1:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need it to talk
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                               process_id=int(os.environ["JAX_PROCESS_ID"]))


def mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
  """The config's (data, fsdp, tensor) with its one -1 replaced by the devices left over."""
  fixed = math.prod(s for s in shape if s != -1)
  return tuple(n_devices // fixed if s == -1 else s for s in shape)


def resolve_init(init_from: str) -> str:
  """A previous stage's workdir means its finished `model/`; anything else goes to from_pretrained."""
  path = Path(init_from)
  if (path / "checkpoints").is_dir():
    if not (path / "model").is_dir():
      raise ValueError(f"{path}: a training workdir with no finished model/ yet; finish that run first")
    return str(path / "model")
  return init_from


def prepare(model: Model, cfg) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, frozen rest) for the config's stage, LoRA added for "lora"."""
  module = model.module
  if cfg.trainable == "lora":
    train_lib.add_lora(module, cfg.lora.rank, cfg.lora.alpha, jax.random.key(cfg.seed))
  return train_lib.split(module, cfg.trainable)


def count(state: nnx.State) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def global_batch(host: dict[str, np.ndarray], mesh: jax.sharding.Mesh, accum_steps: int) -> dict[str, jax.Array]:
  """This host's rows -> global arrays split over the batch axes. With accumulation, a leading
  micro-batch axis: rows and their row-aligned audio windows split into `accum_steps` equal parts."""
  if accum_steps > 1:
    host = {k: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]) for k, x in host.items()}
  batch_axis = int(accum_steps > 1)

  def global_shape(x):
    shape = list(x.shape)
    shape[batch_axis] *= jax.process_count()
    return tuple(shape)

  shardings = train_lib.batch_shardings({k: jax.ShapeDtypeStruct(global_shape(x), x.dtype) for k, x in host.items()},
                                        mesh, accum_steps)
  return {k: jax.make_array_from_process_local_data(shardings[k], x, global_shape(x)) for k, x in host.items()}


def merged_state(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State) -> nnx.State:
  """The whole model's state with trained params in the frozen weights' dtype and LoRA merged away."""
  dtypes = {k: x.dtype for k, x in traverse_util.flatten_dict(nnx.to_pure_dict(frozen)).items()}
  module = nnx.merge(graphdef, params, frozen)
  for _, node in nnx.iter_graph(module):
    if isinstance(node, layers.Linear) and node.lora_a is not None:
      delta = node.lora_scale * jnp.einsum("...ir,...ro->...io", node.lora_a[...], node.lora_b[...])
      node.kernel[...] = (node.kernel[...].astype(jnp.float32) + delta).astype(node.kernel.dtype)
      node.lora_a, node.lora_b, node.lora_scale = nnx.data(None), nnx.data(None), None
  state = nnx.state(module)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  dtype = next(iter(dtypes.values()), jnp.float32)  # trained params go back to the model's dtype
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({k: x.astype(dtypes.get(k, dtype))
                                                                for k, x in flat.items()}))
  return state


def write_model(workdir: Path, model: Model, graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
                init_from: str, cfg) -> None:
  """`workdir/model`: the trained model in from_pretrained's layout (LoRA merged); for a LoRA run also
  `workdir/adapter`, the LoRA alone as a PEFT adapter."""
  files = weights.tokenizer_dir(weights.resolve(init_from))
  weights.save_model(workdir / "model", model.config, merged_state(graphdef, params, frozen), files)
  if cfg.trainable == "lora":
    write_peft_adapter(workdir / "adapter", params, cfg)


def write_peft_adapter(dst: Path, params: nnx.State, cfg) -> None:
  """peft's layout: `adapter_config.json` and `adapter_model.safetensors` with
  `base_model.model.<module-tree path>.lora_{A,B}.weight` (A = lora_a.T, B = lora_b.T)."""
  # Every process gathers (params may be sharded over processes); process 0 alone writes.
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  flat = {k: np.asarray(x, np.float32) for k, x in multihost_utils.process_allgather(flat, tiled=True).items()}
  if jax.process_index() != 0:
    return
  tensors = {}
  for path, x in flat.items():
    which = {"lora_a": "A", "lora_b": "B"}[path[-1]]
    for layer in range(x.shape[0]) if "layers" in path else [None]:
      module = names.module_tree_key(names.hf_key((*path[:-1], "kernel"), layer)).removesuffix(".weight")
      value = x[layer] if layer is not None else x
      tensors[f"base_model.model.{module}.lora_{which}.weight"] = np.ascontiguousarray(value.T)
  dst.mkdir(parents=True)
  save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
            "lora_dropout": 0.0, "bias": "none", "target_modules": ".*" + train_lib.LORA_TARGET, "use_rslora": False}
  (dst / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def memory_summary(compiled) -> str:
  """A compiled step's memory per device, as XLA planned it (some backends do not report it)."""
  m = compiled.memory_analysis()
  if m is None:
    return "memory analysis not available on this backend"
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  return (f"arguments {gib(m.argument_size_in_bytes)}, outputs {gib(m.output_size_in_bytes)}, "
          f"temporaries {gib(m.temp_size_in_bytes)} per device")
