"""Int8 weight-only quantisation for decoding: which linears, and making a model's state int8.

The decoder's linears (q/k/v/o and gate/up/down of every Qwen2 layer, 79 % of AF3's parameters) hold
int8 kernels with a float32 scale per output channel (`layers.Linear.quantize_int8`); the audio
encoder, projector, embeddings, norms and LM head stay in the model's dtype. Activations are not
quantised: each dot reads its int8 weights converted to the compute dtype. Decoding reads every
weight once per token, so halving the decoder's weights is what speeds it up.

Why our own representation and not qwix (google/qwix 0.1.8): qwix's NNX PTQ swaps each weight for a
quantised one from inside the model's first call, where it meets the dot. Our layer stacks are one
stacked state scanned with `jax.lax.scan` (`layers.scan`), so that call sees one layer's slice, and
qwix fails on it (its sharding metadata still has the `layers` axis; tried, 2026-11-24). It also wraps
a single method, where decoding calls `embed`, the decoder and `lm_head` apart. An int8 `Param` plus a
scale `Param` are plain state: they stack, shard by logical axes, and pass through every jit over
(graphdef, state) unchanged.
"""

from __future__ import annotations

import re

import jax
from flax import nnx, traverse_util

from af3_jax.checkpoints import lora, names
from af3_jax.models import layers

MODES = ("none", "int8")  # what `from_pretrained(quantize=...)` and the CLIs' --quantize take
TARGET = lora.TARGET  # every decoder linear, as LoRA's: not the LM head


def mode(quantize: str | None) -> str | None:
  """`from_pretrained`'s `quantize` argument -> None (keep the dtype) or "int8"; "none" is None."""
  if quantize not in (None, *MODES):
    raise ValueError(f"quantize must be one of {', '.join(MODES)}, got {quantize!r}")
  return None if quantize in (None, "none") else quantize


def quantize_module(module: nnx.Module, target: str = TARGET) -> nnx.Module:
  """Quantises (in place) every Linear whose dotted path fully matches `target`; returns the module.
  On an abstract module (under `nnx.eval_shape`) this gives the int8 model's abstract state."""
  pattern = re.compile(target)
  found = [node for path, node in nnx.iter_graph(module)
           if isinstance(node, layers.Linear) and pattern.fullmatch(".".join(map(str, path)))]
  if not found:
    raise ValueError(f"no Linear matches the quantisation target {target!r}")
  for node in found:
    node.quantize_int8()
  return module


def quantize_state(state: nnx.State, abstract_int8: nnx.State, shardings: nnx.State) -> nnx.State:
  """A loaded float state -> the int8 model's state (`abstract_int8`, filled in place and returned),
  one kernel at a time on the device, each float kernel freed once quantised. For what cannot be
  quantised as it streams in: an orbax checkpoint, weights with an adapter merged."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  target = traverse_util.flatten_dict(nnx.to_pure_dict(shardings))
  for path in [p for p in flat if p[-1] == "kernel" and (*p[:-1], names.INT8_SCALE) in target]:
    scale_path = (*path[:-1], names.INT8_SCALE)
    kernel = flat[path]
    flat[path], flat[scale_path] = jax.jit(layers.int8_per_channel,
                                           out_shardings=(target[path], target[scale_path]))(kernel)
    kernel.delete()
  nnx.replace_by_pure_dict(abstract_int8, traverse_util.unflatten_dict(flat))
  return abstract_int8
