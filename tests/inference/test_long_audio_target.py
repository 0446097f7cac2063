"""Music Flamingo's longest audio on one GPU: the prefill of 20 minutes (40 windows of 750 frames, between
its audio bos and eos, in the 32,768-token prompt bucket) at full size in bfloat16, compiled for an H100
without one (deviceless, `af3_jax.targets`), fits the card's 80 GB: weights, the decode state it returns
(the KV cache of 32,768 + 64 slots) and the compiler's temporaries. bench/RESULTS.md has the figures.
"""

import jax
import jax.numpy as jnp
import pytest
from accelerators import abstract_model, compile_for
from flax import nnx

from af3_jax import targets
from af3_jax.buckets import bucket, window_bucket
from af3_jax.config import AF3Config
from af3_jax.inference import decode, requests
from af3_jax.models.whisper import tokens_per_window

WINDOWS = 40  # 20 minutes
NEW_TOKENS = 64  # the smallest new-token bucket


def twenty_minutes(cfg: AF3Config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The prefill's inputs as the engine pads them, as abstract arrays on `mesh`'s device."""
  prompt = 16 + WINDOWS * tokens_per_window(cfg.encoder) + 2  # text around the framed audio
  length, windows = bucket(prompt, requests.MIN_BUCKET), window_bucket(WINDOWS)
  assert (length, windows) == (32768, 40)
  e = cfg.encoder
  shapes = {"input_ids": ((1, length), jnp.int32), "attention_mask": ((1, length), jnp.int32),
            "input_features": ((windows, e.num_mel_bins, e.mel_frames), jnp.float32),
            "input_features_mask": ((windows, e.mel_frames), jnp.int32),
            "audio_embed_mask": ((windows, tokens_per_window(e)), jnp.bool_)}
  on = jax.NamedSharding(mesh, jax.P())
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=on) for k, (shape, dtype) in shapes.items()}


@pytest.mark.accelerator
@pytest.mark.slow
def test_twenty_minutes_prefill_fits_one_h100():
  target = targets.parse("h100")
  cfg = AF3Config.music_flamingo()
  model = abstract_model("h100", cfg, jnp.bfloat16)
  batch = twenty_minutes(cfg, model.mesh)
  shape = requests.Shape(1, batch["input_ids"].shape[1], batch["input_features"].shape[0])
  _, *rest = requests.dummy_batch(cfg, shape)

  def prefill_fn(state, batch):  # generate's start: the prefill into a cache with room for the new tokens
    return decode.start(nnx.merge(model.graphdef, state), batch, *rest, new_len=NEW_TOKENS)

  weights = model.state
  with jax.set_mesh(model.mesh):
    state = jax.eval_shape(prefill_fn, weights, batch)
  program = compile_for(model.mesh, jax.jit(prefill_fn), weights, batch)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  weights_b, state_b, temp_b = nbytes(weights), nbytes(state), program.memory["temporaries_gib"] * 2**30
  total = weights_b + state_b + temp_b
  gib = 2**30
  print(f"H100 prefill of 20 min (Music Flamingo, bf16): weights {weights_b / gib:.2f} GiB, decode state "
        f"{state_b / gib:.2f} GiB, temporaries {temp_b / gib:.2f} GiB, total {total / gib:.2f} GiB of "
        f"{target.hbm_bytes / gib:.1f} GiB")
  assert weights_b == 2 * 8_267_215_360  # every parameter of the released model, in bf16
  assert total < target.hbm_bytes
