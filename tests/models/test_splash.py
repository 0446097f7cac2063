"""`splash`: the TPU attention kernel, run in Pallas' interpreter on the CPU, equals `attention.attention`
for every mask the model makes, forward and backward, sharded or not. What a TPU compiles around it
(the kernel in the model's programs, HBM) is `test_tpu.py`'s.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.attention import case_inputs

from af3_jax import sharding
from af3_jax.models import attention, splash

# (B, T, S, N, K, H) and the masks of each caller; lengths that no block (128 or 512) divides.
CASES = {
    # a left-padded prompt written at slot 0 of a cache with room for new tokens (the offset traced, as
    # `qwen2` passes a cache's end).
    "prefill": dict(shape=(2, 300, 364, 4, 2, 16), causal=True, offset=0, pads=(5, 40)),
    # after earlier tokens, each row at its own slot (the contract allows it; no caller prefills so today).
    "after_cache": dict(shape=(2, 300, 1000, 4, 2, 16), causal=True, offset=(100, 350), pads=(5, 40)),
    # Model.__call__: left padding, no cache.
    "left_padded": dict(shape=(2, 600, 600, 4, 2, 16), causal=True, offset=None, pads=(0, 37)),
    # unpacked training rows: right padding as key lengths.
    "right_padded": dict(shape=(2, 600, 600, 4, 2, 16), causal=True, offset=None, lengths=(600, 250)),
    # the encoder: 1500 positions a window, bidirectional, each window its own key length.
    "encoder": dict(shape=(3, 1500, 1500, 3, 3, 24), causal=False, offset=None, lengths=(1500, 480, 1)),
    # packed training rows: 3 samples then padding, and one sample filling its row.
    "packed": dict(shape=(2, 1100, 1100, 4, 2, 16), causal=True, offset=None, segments=((400, 500, 150), (1100,))),
    # the decoder's head counts (28 query heads on 4 kv heads), tiny otherwise.
    "gqa_28_4": dict(shape=(1, 600, 600, 28, 4, 16), causal=True, offset=None, pads=(30,)),
}


def _splash(q, k, v, **kw):
  return splash.attention(q, k, v, interpret=True, **kw)


@pytest.mark.parametrize("name", CASES)
def test_splash_equals_attention(name):
  """float32, unit-normal inputs: outputs are averages of O(1) values, equal to 1e-5 (seen: ~1e-6) on
  every row that sees a key; rows that see none (padding) are only finite, as on the XLA paths."""
  qkv, kw, mask = case_inputs(CASES[name])
  want = jax.jit(lambda *qkv: attention.attention(*qkv, **kw))(*qkv)
  got = jax.jit(lambda *qkv: _splash(*qkv, **kw))(*qkv)
  assert bool(jnp.isfinite(got).all())
  seen = mask.any(-1)[:, 0]
  np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], rtol=0, atol=1e-5)


def test_splash_gradients_equal_attention():
  """Training differentiates through the kernel (packed rows): d(q, k, v) equal `attention`'s to 1e-5."""
  (q, key, value), kw, mask = case_inputs(CASES["packed"], seed=1)
  weight = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
  seen = jnp.asarray(mask.any(-1)[:, 0])[:, :, None, None]  # padding carries no loss, as in training
  loss = lambda fn: jax.jit(jax.grad(lambda *qkv: jnp.sum(jnp.where(seen, fn(*qkv, **kw) * weight, 0)), argnums=(0, 1, 2)))
  for got, want in zip(loss(_splash)(q, key, value), loss(attention.attention)(q, key, value)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_each_device_runs_the_kernel_on_its_shard():
  """Under a (2, 2, 2) mesh the kernel runs inside a shard_map (rows over data x fsdp, kv heads over
  tensor) and gives the unsharded numbers."""
  qkv, kw, mask = case_inputs(dict(CASES["after_cache"], shape=(4, 300, 1000, 4, 2, 16), offset=(0, 100, 350, 700),
                               pads=(5, 40, 0, 0)))
  want = jax.jit(lambda *qkv: attention.attention(*qkv, **kw))(*qkv)
  fn = jax.jit(lambda *qkv: _splash(*qkv, **kw))
  with jax.set_mesh(sharding.make_mesh((2, 2, 2))):
    assert "sdy.manual_computation" in fn.lower(*qkv).as_text()
    got = fn(*qkv)
  seen = mask.any(-1)[:, 0]
  np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], rtol=0, atol=1e-5)
