"""Qwen2 decoder: mirrors transformers' `Qwen2Model` (the LM head lives in `af3.py`).

RMSNorm, default RoPE (rotate-half pairing), grouped-query attention with q/k/v biases, SwiGLU MLP.
For inference, `Decoder.fuse` joins q/k/v and gate/up into one matmul each (`fuse_linears`).
Shape letters: B batch, T query length, S key length, D width, N heads, K kv heads, G = N / K query
heads per kv head, H head dim, F mlp.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from af3_jax.config import DecoderConfig
from af3_jax import sharding
from af3_jax.models import attention, kv_cache, layers

ACTIVATION_AXES = ("batch", "length", None)


def fuse_linears(combine: Callable[..., jax.Array], target: layers.Linear, *parts: layers.Linear) -> layers.Linear:
  """`parts` joined into one Linear: each of target's variables (kernel, bias) becomes `combine` of the
  parts' (output axis last). `target`, one of the parts, is reused for its logical axes, so `combine`
  must order the columns such that every contiguous shard of them on that axis is a self-contained
  piece, as a shard of the part's own columns is (whole kv-head groups, whole MLP units)."""
  if any(p.lora_a is not None for p in parts):
    raise ValueError("a Linear with LoRA weights cannot be fused: merge them first")
  for name, var in list(vars(target).items()):
    if isinstance(var, nnx.Variable):  # new Variables: the old ones may be shared with another module
      setattr(target, name, var.replace(combine(*(getattr(p, name)[...] for p in parts))))
  return target


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding on (B, T, N, H) at integer positions (B, T), computed in float32.

  HF's `rotate_half` pairs dimension i with i + H/2 (not interleaved pairs).
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """`Qwen2Attention`: causal GQA; q/k/v have biases, o_proj has none."""

  def __init__(self, cfg: DecoderConfig, *, compute_dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.q_proj = layers.Linear(d, n * h, use_bias=True, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Linear(d, k * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
    self.v_proj = layers.Linear(d, k * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
    self.o_proj = layers.Linear(n * h, d, use_bias=False, axes=("heads", "embed"), **kw)
    self.qkv_proj: layers.Linear | None = nnx.data(None)  # `fuse`

  def fuse(self) -> None:
    """Replaces q/k/v_proj by one `qkv_proj` (an inference layout; checkpoints keep the three). Its
    columns hold, for each kv head, its G query heads, its key and its value, (K, G + 2, H) flattened:
    a tensor-parallel shard of whole kv heads holds whole groups, as k_proj's and q_proj's shards do,
    so splitting the output needs no communication."""
    kv, g, h = self.cfg.num_kv_heads, self.cfg.num_heads // self.cfg.num_kv_heads, self.cfg.head_dim

    def grouped(q, k, v):
      lead = q.shape[:-1]
      heads = [q.reshape(*lead, kv, g, h), k.reshape(*lead, kv, 1, h), v.reshape(*lead, kv, 1, h)]
      return jnp.concatenate(heads, axis=-2).reshape(*lead, -1)

    self.qkv_proj = fuse_linears(grouped, self.k_proj, self.q_proj, self.k_proj, self.v_proj)
    self.q_proj = self.k_proj = self.v_proj = nnx.data(None)

  def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, T, D) -> q (B, T, N, H), k and v (B, T, K, H), before RoPE."""
    b, t, _ = x.shape
    n, k, h = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
    if self.qkv_proj is None:
      return (self.q_proj(x).reshape(b, t, n, h), self.k_proj(x).reshape(b, t, k, h),
              self.v_proj(x).reshape(b, t, k, h))
    y = self.qkv_proj(x).reshape(b, t, k, n // k + 2, h)
    return y[:, :, :, :-2].reshape(b, t, n, h), y[:, :, :, -2], y[:, :, :, -1]

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array | None,
               cache: kv_cache.Cache | None = None, layer: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               kv_lengths: jax.Array | None = None) -> tuple[jax.Array, kv_cache.Cache | None]:
    """x (B, T, D); positions (B, T) int; key_mask (B, S) bool: the keys that are real tokens, or None
    with `kv_lengths` (B,) int: each row's first kv_lengths keys are (right padding).

    Without a cache, or with an empty one (end None), the keys are the T tokens themselves (S = T). With
    `cache` (stacked over layers) this is layer `layer`: its new keys and values are written at slots
    end..end+T-1 of its rows first, and after a prefill the queries attend over the cache's first S
    slots, S being key_mask's length (all of them, or the window `Decoder` reads). Causal either way.
    `segment_ids` (B, T) int (no cache): a token attends only within its own segment, a sample of a
    packed row. Returns the output (B, T, D) and the updated cache.
    """
    b, t, _ = x.shape
    cfg = self.cfg
    q, k, v = self._project(x)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    offset = None if cache is None else cache.end  # None: the keys are the new tokens themselves
    if cache is not None:
      cache = cache.replace(k=kv_cache.write(cache.k, k, cache.end, layer), v=kv_cache.write(cache.v, v, cache.end, layer))
    if offset is not None:
      s = key_mask.shape[1]
      k, v = cache.k[layer, :, :s], cache.v[layer, :, :s]
    # With a cache, new token i sits at slot end + i; the slots after it are empty or in its future.
    o = attention.attention(q, k, v, scale=cfg.head_dim**-0.5, key_mask=key_mask, kv_lengths=kv_lengths,
                            causal=True, q_offset=offset, segment_ids=segment_ids)
    return self.o_proj(o.reshape(b, t, -1)), cache


class MLP(nnx.Module):
  """`Qwen2MLP`: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: DecoderConfig, *, compute_dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = layers.Linear(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = layers.Linear(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = layers.Linear(f, d, axes=("mlp", "embed"), **kw)
    self.gate_up_proj: layers.Linear | None = nnx.data(None)  # `fuse`

  def fuse(self) -> None:
    """Replaces gate/up_proj by one `gate_up_proj` (an inference layout) whose columns alternate gate
    and up, (F, 2) flattened: a tensor-parallel shard of the MLP units holds both halves of each."""
    self.gate_up_proj = fuse_linears(lambda gate, up: jnp.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1),
                                     self.up_proj, self.gate_proj, self.up_proj)
    self.gate_proj = self.up_proj = nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gate_up_proj is None:
      gate, up = self.gate_proj(x), self.up_proj(x)
    else:
      y = self.gate_up_proj(x).reshape(*x.shape[:-1], -1, 2)
      gate, up = y[..., 0], y[..., 1]
    return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
  """`Qwen2DecoderLayer`: pre-RMSNorm attention and MLP, each with a residual."""

  def __init__(self, cfg: DecoderConfig, *, compute_dtype, param_dtype, rngs: nnx.Rngs):
    norm = dict(eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = MLP(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, **norm)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, **norm)

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array | None,
               cache: kv_cache.Cache | None = None, layer: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               kv_lengths: jax.Array | None = None) -> tuple[jax.Array, kv_cache.Cache | None]:
    """(B, T, D) -> (B, T, D) and the updated cache (None without one), as `Attention`."""
    h, cache = self.self_attn(self.input_layernorm(x), positions, key_mask, cache, layer, segment_ids, kv_lengths)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, cache


class Decoder(nnx.Module):
  """`Qwen2Model`: token embeddings, the layer stack and the final norm."""

  def __init__(self, cfg: DecoderConfig, *, compute_dtype, param_dtype, remat: str | None = None, rngs: nnx.Rngs):
    self.remat = remat
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), compute_dtype=compute_dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.layers = layers.stack(lambda r: DecoderLayer(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=r),
                               cfg.num_layers, rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

  def fuse(self) -> None:
    """Every layer's q/k/v and gate/up projections as one matmul each (`Attention.fuse`, `MLP.fuse`)."""
    self.layers.self_attn.fuse()
    self.layers.mlp.fuse()

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array,
               cache: kv_cache.Cache | None = None,
               segment_ids: jax.Array | None = None, *,
               window: int | None = None, right_padded: bool = False) -> tuple[jax.Array, kv_cache.Cache | None]:
    """Input embeddings (B, T, D) -> (final hidden states (B, T, D), the updated cache or None).

    key_mask (B, T) bool marks real tokens (False: padding); `right_padded` (static) says each row's
    real tokens come first (the training pipeline's and the engine's prompts), so attention among the
    new tokens takes row lengths (cuDNN runs them as lengths, not as a (T, T) mask). With a
    `kv_cache.Cache`, the T tokens are appended to each row at its `end`
    and attend over everything written before them: nothing in an empty cache (end None: the prompt),
    else the prompt and the tokens since (a decode step). `window` (static): attention reads only the
    cache's first `window` slots, which must hold every row's tokens, the new ones included (the
    engine's decode step, whose rows mostly fill a small part of a long cache); the new keys are
    written into the whole cache all the same. Without a cache, `segment_ids` (B, T) int (0 on
    padding) keeps the samples of packed rows apart.
    """
    if cache is not None:
      cache = cache.replace(key_mask=kv_cache.write(cache.key_mask, key_mask, cache.end))
    # The keys each layer's attention reads: after a prefill the cache's first `window` slots, else the
    # new tokens themselves.
    if cache is not None and cache.end is not None:
      keys = dict(key_mask=cache.key_mask[:, :window])
    elif right_padded:
      keys = dict(key_mask=None, kv_lengths=key_mask.sum(-1, dtype=jnp.int32))
    else:
      keys = dict(key_mask=key_mask)
    if cache is None:
      step = lambda layer, h, _: (sharding.constrain(layer(h, positions, segment_ids=segment_ids, **keys)[0],
                                                     ACTIVATION_AXES), None)
      x, _ = layers.scan(self.layers, step, x, remat=self.remat)
      return self.norm(x), None

    # The cache is the scan's carry, not its per-layer input and output: each layer writes only its
    # new slots (in place), where per-layer outputs would copy the whole cache at every step.
    def cached_step(layer, carry, index):
      h, cache = carry
      h, cache = layer(h, positions, cache=cache, layer=index, **keys)
      return (sharding.constrain(h, ACTIVATION_AXES), cache), None

    (x, cache), _ = layers.scan(self.layers, cached_step, (x, cache), jnp.arange(cache.k.shape[0]),
                                remat=self.remat)
    b, t = x.shape[:2]
    end = jnp.full((b,), t, jnp.int32) if cache.end is None else cache.end + t
    cache = cache.replace(k=sharding.constrain(cache.k, kv_cache.AXES), v=sharding.constrain(cache.v, kv_cache.AXES),
                          end=end)
    return self.norm(x), cache
