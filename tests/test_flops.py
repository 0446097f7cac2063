"""`af3_jax.flops` against two independent counts: XLA's cost analysis of the compiled forward pass, and
the parameter shapes of the full-size model."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from af3_jax import flops, sharding
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig
from af3_jax.pretrained import abstract_model, init_random


def test_the_forward_count_is_what_xla_compiles():
  """One layer each (XLA counts a scanned layer stack's body once), wide enough that matmuls dominate.
  Dense attention computes every (query, key) score, masked or not, so the pairs are T x T here; what XLA
  counts beyond ours is normalisation, activations and softmax: a few percent."""
  cfg = AF3Config(encoder=EncoderConfig(hidden_size=128, num_layers=1, num_heads=2, intermediate_size=512,
                                        max_source_positions=200),
                  decoder=DecoderConfig(vocab_size=2048, hidden_size=256, num_layers=1, num_heads=4,
                                        num_kv_heads=2, head_dim=64, intermediate_size=1024),
                  audio_token_id=2047)
  graphdef, state = nnx.split(init_random(cfg, dtype=jnp.float32).module())
  rows, length, windows = 2, 256, 3
  inputs = {"input_ids": jnp.ones((rows, length), jnp.int32),
            "input_features": jnp.zeros((windows, cfg.encoder.num_mel_bins, cfg.encoder.mel_frames)),
            "input_features_mask": jnp.ones((windows, cfg.encoder.mel_frames), jnp.int32)}
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x))
  xla = forward.lower(state, inputs).compile().cost_analysis()["flops"]
  ours = flops.forward_flops(cfg, tokens=rows * length, attention_pairs=rows * length * length, windows=windows)
  assert 0.9 * xla <= ours <= xla, (ours, xla)
  assert flops.train_flops(cfg, tokens=5, attention_pairs=7, windows=1) == 3 * flops.forward_flops(
      cfg, tokens=5, attention_pairs=7, windows=1)


def test_a_token_costs_twice_the_full_decoders_matmul_weights():
  """At the released size: 2 FLOPs per weight of every decoder linear and the LM head (not the embedding
  table, a lookup), counted from the model's own parameter shapes."""
  cfg = AF3Config()
  _, state, _ = abstract_model(cfg, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16,
                               mesh=sharding.single_device_mesh())
  weights = 0
  for path, x in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items():
    if path[0] in ("language_model", "lm_head") and path[-1] == "kernel":
      weights += int(np.prod(x.shape))
  assert flops.decoder_flops_per_token(cfg.decoder) == 2 * weights
  assert weights > 7e9  # the 7.6B decoder less its 0.54B embedding table

