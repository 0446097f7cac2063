"""`attention.attention`: the blockwise path equals XLA's one-piece attention, picks itself by size, and
keeps compiled temporaries linear in the prompt at the full decoder's head shape (docs/performance.md#attention-backends).
Segments of packed rows never see each other, on either path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.attention import case_inputs, reference_mask, segment_ids

from af3_jax.config import DecoderConfig
from af3_jax.models import attention, kv_cache, qwen2

# (B, T, S, N, K, H): GQA, MQA and plain multi-head; T of 1030 leaves a part block (blocks overlap).
CASES = {
    "decoder": dict(shape=(2, 1100, 1100, 4, 2, 16), causal=True, offset=None, pads=(0, 37)),
    "cache": dict(shape=(2, 700, 1900, 4, 2, 16), causal=True, offset=1100, pads=(5, 300)),
    "mqa_part_block": dict(shape=(1, 1030, 1030, 3, 1, 24), causal=True, offset=None, pads=(0,)),
    "encoder": dict(shape=(3, 1500, 1500, 3, 3, 24), causal=False, offset=None, lengths=(1500, 480, 1)),
    # Packed rows: 3 samples then right padding, and 1 sample filling its row; a block boundary (512)
    # falls inside a sample.
    "packed": dict(shape=(2, 1100, 1100, 4, 2, 16), causal=True, offset=None, segments=((400, 500, 150), (1100,))),
}


@pytest.mark.parametrize("name", CASES)
def test_blockwise_equals_xla(name, monkeypatch):
  """float32, unit-normal inputs: outputs are averages of O(1) values, equal to 1e-5 (seen: ~1e-6)."""
  (q, key, value), kw, mask = case_inputs(CASES[name])
  h = q.shape[-1]
  with jax.default_matmul_precision("highest"):
    want = jax.nn.dot_product_attention(q, key, value, mask=jnp.asarray(mask), scale=h**-0.5, implementation="xla")
    monkeypatch.setattr(attention, "DENSE_MAX_SCORES", 0)
    got = jax.jit(lambda q, k, v: attention.attention(q, k, v, **kw))(q, key, value)
  assert bool(jnp.isfinite(got).all())  # rows that see no key (padding) too: they feed later layers
  seen = mask.any(-1)[:, 0]  # (B, T): rows with a visible key
  np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], rtol=0, atol=1e-5)


def test_blockwise_gradients_equal_xla(monkeypatch):
  """Training differentiates through the blockwise path: d(q, k, v) equal XLA's to 1e-5 (float32)."""
  b, t, n, k, h = 2, 600, 4, 2, 8
  rng = np.random.default_rng(1)
  q, key, value, weight = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                           for shape in [(b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)])
  mask = reference_mask(b, t, t, causal=True, offset=None, pads=(0, 30))
  seen = jnp.asarray(mask.any(-1)[:, 0])[:, :, None, None]  # padded query rows carry no loss, as in training
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask), implementation="xla")
  ours = lambda q, k, v: attention.attention(q, k, v, scale=h**-0.5, key_mask=jnp.asarray(mask[:, 0, -1]), causal=True)
  loss = lambda fn: jax.jit(jax.grad(lambda *qkv: jnp.sum(jnp.where(seen, fn(*qkv) * weight, 0)), argnums=(0, 1, 2)))
  with jax.default_matmul_precision("highest"):
    want = loss(xla)(q, key, value)
    monkeypatch.setattr(attention, "DENSE_MAX_SCORES", 0)
    got = loss(ours)(q, key, value)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5)


def _has_loop(b, t, s, n=4, k=2) -> bool:
  q, kv = jax.ShapeDtypeStruct((b, t, n, 16), jnp.float32), jax.ShapeDtypeStruct((b, s, k, 16), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q, k, v: attention.attention(q, k, v, scale=0.25, causal=True))(q, kv, kv)
  return any(loop in str(jaxpr) for loop in ("scan", "while"))


def test_one_piece_up_to_the_threshold_then_blockwise():
  assert attention.DENSE_MAX_SCORES == 2**24  # B N T S; 64 MiB of float32 scores
  assert not _has_loop(1, 2048, 2048)  # 4 heads x 2048 x 2048 = 2^24: one piece
  assert _has_loop(1, 2048, 2049)
  assert _has_loop(16, 1, 2**18 + 1)  # a decode step over a very long cache goes blockwise too
  assert not _has_loop(8, 1, 16_448)  # a decode step after a 10-minute prompt, 8 rows: one piece


def _prefill_temp_bytes(t: int) -> int:
  """Compiled temporaries of one full-size decoder attention (28 heads, 4 kv heads, 128 dims, float32)
  writing a T-token prompt into a cache of T + 64 slots, left padding and causality as in `qwen2`."""
  b, n, k, h, s = 1, 28, 4, 128, t + 64
  shapes = (jax.ShapeDtypeStruct((b, t, n, h), jnp.float32), jax.ShapeDtypeStruct((b, s, k, h), jnp.float32),
            jax.ShapeDtypeStruct((b, s, k, h), jnp.float32), jax.ShapeDtypeStruct((b, s), bool),
            jax.ShapeDtypeStruct((), jnp.int32))
  fn = lambda q, k, v, key_mask, end: attention.attention(q, k, v, scale=h**-0.5, key_mask=key_mask, causal=True,
                                                       q_offset=end)
  return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_temporaries_grow_linearly_with_the_prompt():
  small, big = _prefill_temp_bytes(2048), _prefill_temp_bytes(8192)
  print(f"attention temporaries: T=2048 {small / 2**20:.0f} MiB, T=8192 {big / 2**20:.0f} MiB")
  assert big <= 4 * small  # 4x the prompt: linear is at most 4x (a quadratic term would give ~16x)
  assert big < 8192 * 8256 * 4  # less than one head's float32 (T, S) scores (258 MiB); XLA's: 28 of them


def test_decoder_blockwise_equals_one_piece(monkeypatch):
  """The decoder's cached prefill and a decode step give the same hidden states either way."""
  cfg = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
  decoder = qwen2.Decoder(cfg, compute_dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(decoder)
  b, t = 2, 600
  x = jax.random.normal(jax.random.key(1), (b, t + 1, cfg.hidden_size))
  key_mask = jnp.arange(t + 1)[None] >= jnp.array([[0], [45]])  # row 1 is left padded
  positions = jnp.maximum(jnp.cumsum(key_mask, axis=-1) - 1, 0)

  def hidden(state):
    model = nnx.merge(graphdef, state)
    cache = kv_cache.init(cfg, b, t + 64, jnp.float32)
    h, cache = model(x[:, :t], positions[:, :t], key_mask[:, :t], cache)
    step, _ = model(x[:, t:], positions[:, t:], key_mask[:, t:], cache)
    return jnp.concatenate([h, step], axis=1)

  with jax.default_matmul_precision("highest"):
    one_piece = jax.jit(hidden)(state)
    monkeypatch.setattr(attention, "DENSE_MAX_SCORES", 0)
    blockwise = jax.jit(lambda state: hidden(state))(state)  # a new function: traced afresh
  real = np.asarray(key_mask)
  np.testing.assert_allclose(np.asarray(blockwise)[real], np.asarray(one_piece)[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["one_piece", "blockwise"])
def test_a_packed_sample_never_sees_another(path, monkeypatch):
  """The decoder over a packed row (samples of 400, 500 and 150 tokens, then padding): new embeddings
  for the second sample leave the others' hidden states bit-identical, and the last one's equal its
  own alone (positions from 0). Padding sees no key: its outputs, read by nothing, are only finite."""
  cfg = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
  decoder = qwen2.Decoder(cfg, compute_dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(decoder)
  ids = segment_ids(1, 1100, [(400, 500, 150)])
  positions = np.concatenate([np.arange(n) for n in (400, 500, 150, 50)])[None]
  x = jax.random.normal(jax.random.key(1), (1, 1100, cfg.hidden_size))
  other = x.at[:, 400:900].set(jax.random.normal(jax.random.key(2), (1, 500, cfg.hidden_size)))
  if path == "blockwise":
    monkeypatch.setattr(attention, "DENSE_MAX_SCORES", 0)

  @jax.jit
  def hidden(x, positions, segments):
    return nnx.merge(graphdef, state)(x, positions, segments > 0, segment_ids=segments)[0]

  with jax.default_matmul_precision("highest"):
    packed = np.asarray(hidden(x, positions, ids))
    changed = np.asarray(hidden(other, positions, ids))
    alone = np.asarray(hidden(x[:, 900:1050], positions[:, 900:1050], ids[:, 900:1050]))
  assert np.isfinite(packed).all()  # padding sees no key, and stays finite
  kept = (ids[0] != 2) & (ids[0] > 0)
  np.testing.assert_array_equal(changed[0, kept], packed[0, kept])
  assert not np.allclose(changed[0, 400:900], packed[0, 400:900])
  np.testing.assert_allclose(packed[0, 900:1050], alone[0], rtol=0, atol=1e-5)
