"""Leaf layers. Every parameter of the model is created here, each tagged with logical axis names.

Parameters live in `param_dtype`; `__call__` computes in `compute_dtype`. Norms compute in float32 whatever the
compute dtype, as the PyTorch reference does. Weight layouts: Linear `kernel` is (in, out) (the transpose
of torch's `weight`), Conv1d `kernel` is (k, in, out). A Linear may hold its kernel in int8 instead
(`Linear.quantize_int8`, for decoding), with a float32 scale per output channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

_normal = jax.nn.initializers.normal(0.02)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
  """A parameter with logical axes. Sharding is applied by `sharding.py`, never eagerly here."""
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


def int8_per_channel(kernel):
  """A (..., in, out) kernel -> (int8 kernel of its shape, float32 scale (..., out)): symmetric, one
  scale per output channel, kernel ~ q * scale with q in [-127, 127] rounded to nearest.

  Written with array methods and operators only, so it runs on numpy arrays (the loader quantises on the
  host as tensors stream in) and on jax arrays (under jit) alike. An all-zero channel gets scale 0.
  """
  w = kernel.astype("float32")
  scale = abs(w).max(axis=-2) * (1 / 127)  # as XLA computes w / 127: host and device scales agree
  q = (w / (scale + (scale == 0))[..., None, :]).round().clip(-127, 127)
  return q.astype("int8"), scale


class Linear(nnx.Module):
  """`torch.nn.Linear`: y = x @ kernel + bias, plus an optional LoRA term (peft's `lora.Linear`).

  With LoRA (`add_lora`): y = x @ kernel + lora_scale * (x @ lora_a) @ lora_b + bias, where lora_a
  (in, r) = peft's `lora_A.weight.T` and lora_b (r, out) = `lora_B.weight.T`. The base `kernel` keeps its
  path and value, so checkpoints load unchanged and LoRA weights train as `nnx.LoRAParam`.

  Quantised (`quantize_int8`): `kernel` holds int8 and `kernel_scale` (out,) float32, and
  y = (x @ kernel) * kernel_scale: the dot reads the int8 weights converted to the compute dtype (a
  convert XLA can fuse into the matmul's operand), and the scale applies to its (..., out) result.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: Axes, compute_dtype,
               param_dtype, rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    self.kernel = param(rngs, _normal, (in_features, out_features), param_dtype, axes)
    self.bias = param(rngs, jax.nn.initializers.zeros, (out_features,), param_dtype, axes[1:]) if use_bias else None
    self.kernel_scale: nnx.Param | None = nnx.data(None)
    self.lora_a: nnx.LoRAParam | None = nnx.data(None)
    self.lora_b: nnx.LoRAParam | None = nnx.data(None)
    self.lora_scale: float | None = None

  def quantize_int8(self) -> None:
    """Replaces the kernel by its int8 form (`int8_per_channel`) and a `kernel_scale` on the kernel's
    output axis (stacked layers: (L, out), axes (layers, out_axis)). Works on abstract modules too."""
    if self.kernel_scale is not None:
      raise ValueError("this Linear is already quantised")
    *lead_axes, in_axis, out_axis = nnx.get_partition_spec(self.kernel).get_value()
    q, scale = int8_per_channel(self.kernel[...])
    self.kernel = nnx.Param(q, out_sharding=(*lead_axes, in_axis, out_axis), eager_sharding=False)
    self.kernel_scale = nnx.Param(scale, out_sharding=(*lead_axes, out_axis), eager_sharding=False)

  def add_lora(self, rank: int, alpha: float, key: jax.Array, param_dtype=jnp.float32) -> None:
    """Adds LoRA weights of rank `rank` with scale alpha / rank, as peft initialises them.

    lora_a ~ U(-1/sqrt(in), 1/sqrt(in)) (peft: kaiming_uniform_(a=sqrt(5)) on lora_A), lora_b = 0, so
    the layer's output is unchanged. Works on stacked layers too: a kernel (L, in, out) with axes
    (layers, in_axis, out_axis) gets lora_a (L, in, r) and lora_b (L, r, out), axes to match.
    """
    if self.lora_a is not None:
      raise ValueError("this Linear already has LoRA weights")
    *lead, n_in, n_out = self.kernel.shape
    *lead_axes, in_axis, out_axis = nnx.get_partition_spec(self.kernel).get_value()
    bound = n_in**-0.5
    a = jax.random.uniform(key, (*lead, n_in, rank), param_dtype, -bound, bound)
    self.lora_a = nnx.LoRAParam(a, out_sharding=(*lead_axes, in_axis, None), eager_sharding=False)
    self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, n_out), param_dtype),
                                out_sharding=(*lead_axes, None, out_axis), eager_sharding=False)
    self.lora_scale = alpha / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.compute_dtype)
    kernel = self.kernel[...].astype(self.compute_dtype)
    if self.kernel_scale is None:
      y = jnp.dot(x, kernel)
    else:
      y = (jnp.dot(x, kernel, preferred_element_type=jnp.float32) * self.kernel_scale[...]).astype(self.compute_dtype)
    if self.lora_a is not None:
      h = jnp.dot(x, self.lora_a[...].astype(self.compute_dtype))
      y = y + self.lora_scale * jnp.dot(h, self.lora_b[...].astype(self.compute_dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    return y


class Embed(nnx.Module):
  """`torch.nn.Embedding`: a (num, features) table."""

  def __init__(self, num: int, features: int, *, axes: Axes, compute_dtype, param_dtype, rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    self.embedding = param(rngs, _normal, (num, features), param_dtype, axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.compute_dtype)


class RMSNorm(nnx.Module):
  """Qwen2RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

  def __init__(self, features: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, jax.nn.initializers.ones, (features,), param_dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
  """`torch.nn.LayerNorm` with scale and bias, computed in float32."""

  def __init__(self, features: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, jax.nn.initializers.ones, (features,), param_dtype, ("norm",))
    self.bias = param(rngs, jax.nn.initializers.zeros, (features,), param_dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Conv1d(nnx.Module):
  """`torch.nn.Conv1d` with symmetric zero padding, on (batch, length, channels) inputs."""

  def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, stride: int, padding: int,
               axes: Axes, compute_dtype, param_dtype, rngs: nnx.Rngs):
    self.compute_dtype = compute_dtype
    self.stride = stride
    self.padding = padding
    self.kernel = param(rngs, _normal, (kernel_size, in_channels, out_channels), param_dtype, (None, *axes))
    self.bias = param(rngs, jax.nn.initializers.zeros, (out_channels,), param_dtype, axes[1:])

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype),
        window_strides=(self.stride,), padding=[(self.padding, self.padding)],
        dimension_numbers=("NWC", "WIO", "NWC"))
    return y + self.bias[...].astype(self.compute_dtype)


# For jitted programs that run unrolled stacks (`scan` with remat None): two XLA passes that would
# otherwise copy stacked weights on a GPU (tests/test_decode_gpu.py shows both). SliceSinker sees each
# layer convert its slice of a stacked int8 kernel to the compute dtype and merges those L converts
# into one convert of the whole stack, written to memory before the first layer, where each would
# otherwise sit inside its layer's matmul (XLA's Triton GEMM reads s8 and converts in registers).
# DotMerger joins matmuls that share an input (q, k and v in the engine's 8-slot step) into one over
# their kernels side by side, and copies each layer's slices to build it (`Model.fused` joins them
# once, at load).
INFERENCE_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "slice-sinker,dot-merger"}

REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num_layers` independent copies of `make(rngs)`, parameters stacked on a leading `layers` axis."""

  # nnx.transform_metadata (not vmap's own option) adds the `layers` axis in graph and tree mode alike.
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0)
  @nnx.transform_metadata(in_axes=0, out_axes=0, partition="layers")
  def create(rngs: nnx.Rngs) -> nnx.Module:
    return make(rngs)

  return create(rngs)


def scan(layers: nnx.Module, fn: Callable, carry, xs=None, *, remat: str | None = None):
  """Runs stacked `layers` in order: `fn(layer, carry, x) -> (carry, y)`, x and y stacked over layers.

  Training (`remat` a policy name in `REMAT_POLICIES`, "none" keeping every activation) runs a
  `lax.scan`: the body is traced and compiled once, so compile time does not grow with depth, and each
  layer's weights are a dynamic slice of the stacks. Inference (`remat` None) unrolls the same scan: each
  layer reads its weights at a static index, which XLA:GPU hands to the matmul where they lie. A dynamic
  slice it copies first, every layer of every step: half of a decode step's time on an H200
  (docs/performance.md#the-inference-layout). Compile time grows with depth instead (bench/RESULTS.md); programs that run
  unrolled stacks compile with `INFERENCE_COMPILER_OPTIONS`.
  """
  graphdef, state = nnx.split(layers)

  def body(carry, state_and_x):
    layer_state, x = state_and_x
    return fn(nnx.merge(graphdef, layer_state), carry, x)

  if remat is None:
    return jax.lax.scan(body, carry, (state, xs), unroll=True)
  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  return jax.lax.scan(body, carry, (state, xs))
