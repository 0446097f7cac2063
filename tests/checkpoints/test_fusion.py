"""`Model.fused` (q/k/v and gate/up as one matmul each, for inference) against the model as loaded:
logits within float32 rounding, the same greedy tokens, the same collectives under tensor parallelism,
int8 weights fused alike, and no way into an export."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import audio_tokens, left_pad, random_features, random_text
from helpers.parity import assert_close

import af3_jax
from af3_jax import sharding
from af3_jax.checkpoints import lora, safetensors
from af3_jax.checkpoints.pretrained import init_random
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig
from af3_jax.inference import slots


def audio_batch(rng, tiny):
  """Two rows: one with a 20 s window and one with text only, left padded."""
  feats, mask = random_features(rng, [2000])
  rows = [np.concatenate([random_text(rng, tiny, 5), np.full(audio_tokens(2000), tiny.audio_token_id),
                          random_text(rng, tiny, 4)]), random_text(rng, tiny, 30)]
  return left_pad(rows) | {"input_features": feats, "input_features_mask": mask}


@pytest.fixture(scope="module")
def fused(gqa_loaded):
  return gqa_loaded.fused()


def test_fused_logits_and_tokens_equal_the_loaded_models(gqa_ckpt, gqa_loaded, fused):
  batch = audio_batch(np.random.default_rng(0), gqa_ckpt.tiny)
  assert_close(fused(**batch), gqa_loaded(**batch), rtol=1e-5)
  expected = af3_jax.generate(gqa_loaded, batch, 12, repetition_penalty=2.0)
  assert len(np.unique(expected)) > 2, f"degenerate reference path {expected}"
  np.testing.assert_array_equal(af3_jax.generate(fused, batch, 12, repetition_penalty=2.0), expected)
  attention = gqa_loaded.state["language_model"]["layers"]["self_attn"]
  assert {"q_proj", "k_proj", "v_proj"} <= set(attention) and "qkv_proj" not in attention  # left as it was


def test_an_int8_model_fuses_its_int8_kernels_and_scales(gqa_ckpt):
  """Fused after quantising: the int8 kernels, per-channel scales and biases are joined alike."""
  quantized = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32, quantize="int8")
  fused = quantized.fused()
  qkv = fused.state["language_model"]["layers"]["self_attn"]["qkv_proj"]
  assert qkv["kernel"][...].dtype == jnp.int8 and qkv["kernel_scale"][...].shape == qkv["bias"][...].shape
  batch = audio_batch(np.random.default_rng(1), gqa_ckpt.tiny)
  assert_close(fused(**batch), quantized(**batch), rtol=1e-5)


def test_a_fused_model_is_neither_exported_nor_adapted(fused):
  with pytest.raises(ValueError, match="language_model.layers.mlp.gate_up_proj.kernel is a fused inference weight"):
    list(safetensors.torch_tensors(fused.state))
  adapted = lora.add(fused.module(), lora.Spec(rank=2, alpha=4.0), jax.random.key(0))
  assert not any("qkv_proj" in name or "gate_up_proj" in name for name in adapted)


def test_tensor_parallel_shards_hold_whole_kv_groups():
  """On a 2-way tensor mesh the fused kernels shard their columns over `tensor` like the separate ones,
  and the decode step needs no more collectives: each shard's columns are whole kv-head groups (joined
  end to end, [q | k | v] would put all of q on one shard and k, v on the other)."""
  cfg = AF3Config(encoder=EncoderConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                  decoder=DecoderConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                        head_dim=8, intermediate_size=64),
                  audio_token_id=127)
  mesh = sharding.make_mesh((1, 1, 2), jax.devices()[:2])
  model = init_random(cfg, dtype=jnp.float32, mesh=mesh)
  fused = model.fused()
  layer = fused.state["language_model"]["layers"]
  for kernel in (layer["self_attn"]["qkv_proj"]["kernel"], layer["mlp"]["gate_up_proj"]["kernel"]):
    assert kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")

  def collectives(m):
    state = jax.eval_shape(lambda: slots.empty_fn(cfg, batch=2, length=64, dtype=jnp.float32))
    with jax.set_mesh(mesh):
      hlo = slots.decode_fn.lower(m.graphdef, m.state, state, np.ones(2, np.int32), window=64,
                                  steps=8).compile().as_text()
    return collections.Counter(re.findall(r"(all-gather|all-reduce|all-to-all|collective-permute)(?:-start)?\(", hlo))

  separate = collectives(model)
  assert separate and collectives(fused) == separate
