"""Programs compiled for TPU slices on this CPU machine (deviceless, `af3_jax.targets`): long-prompt
attention runs in the Pallas splash kernel (`tpu_custom_call`), a decode step stays on XLA, and the
program fits the chips' HBM (libtpu refuses to compile one that does not; we also check the plan).
Tiny models for CI; the full-size 10-minute prefill and stage-5 training step are slow (minutes each
on 2 cores). Needs the `accelerators` extra and JAX_PLATFORMS=cpu (`pytest -m accelerator`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.tiny import TINY

from af3_jax import memory, sharding, targets
from af3_jax.buckets import bucket, window_bucket
from af3_jax.checkpoints.pretrained import abstract_model
from af3_jax.config import AF3Config
from af3_jax.inference import decode, requests, slots
from af3_jax.models.whisper import tokens_per_window
from af3_jax.training import pipeline, plans

pytestmark = pytest.mark.accelerator

KERNEL = "tpu_custom_call"
CFG = TINY[0].config()  # the gqa shape (helpers.tiny)
NEW_TOKENS = 64  # requests.MIN_BUCKET: the cache's room after the prompt


@pytest.fixture(autouse=True)
def _default_precision():
  """conftest's "highest" matmul precision makes Mosaic refuse the bfloat16 kernel (see `splash`)."""
  with jax.default_matmul_precision("default"):
    yield


def _fits(compiled, target: str, what: str) -> None:
  """The program's peak on one device (`memory.memory_plan`) is within the target's HBM."""
  plan = memory.memory_plan(compiled, targets.parse(target).hbm_bytes)
  print(f"{what} on {target}: {memory.memory_summary(plan)}")
  assert memory.fits(plan), memory.memory_summary(plan)


def _prefill_and_step(cfg: AF3Config, target: str, windows: int, dtype=jnp.bfloat16):
  """`generate`'s start (`decode.start`: the prefill of one NVIDIA-style prompt, text, then `<sound>` x
  750 and a newline a window, padded to the buckets) and one decode step after it (`slots.decode`),
  compiled for `target` with the model split over every device by heads (tensor parallel: mesh (1, 1, n))."""
  devices = targets.devices(target)
  mesh = sharding.make_mesh((1, 1, len(devices)), devices)
  graphdef, abstract, shardings = abstract_model(cfg, param_dtype=dtype, compute_dtype=dtype, mesh=mesh)
  length = bucket(16 + windows * (tokens_per_window(cfg.encoder) + 1), requests.MIN_BUCKET)
  shapes = pipeline.batch_shapes(1, window_bucket(windows), length, packed=False)
  del shapes["labels"]
  batch_shardings = sharding.batch_shardings({k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}, mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_shardings[k]) for k, (shape, dt) in shapes.items()}
  shape = requests.Shape(1, length, window_bucket(windows))
  _, *rest = requests.dummy_batch(cfg, shape)

  def prefill_fn(state, batch):
    return decode.start(nnx.merge(graphdef, state), batch, *rest, new_len=NEW_TOKENS)

  def step_fn(state, decoding):
    return slots.decode(nnx.merge(graphdef, state), decoding, np.ones(1, np.int32), window=length + NEW_TOKENS,
                        steps=1)

  with jax.set_mesh(mesh):
    prefill = jax.jit(prefill_fn, in_shardings=(shardings, None)).lower(abstract, batch).compile()
    decoding = jax.eval_shape(prefill_fn, abstract, batch)
    step = jax.jit(step_fn, in_shardings=(shardings, None), donate_argnums=1).lower(abstract, decoding).compile()
  return prefill, step


def _train_step(cfg, model_cfg: AF3Config, target: str, length: int):
  """The stage config's train step for `length`-token rows, built as `train.py --compile_only` builds it
  (the config's mesh, batch, accumulation, remat, dtypes), compiled for `target`."""

  devices = targets.devices(target)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  frozen, state, step_fn = plans.abstract_step(cfg, model_cfg, mesh)
  with jax.set_mesh(mesh):
    return step_fn.lower(state, frozen, plans.abstract_batch(cfg, mesh, length)).compile()


@pytest.mark.parametrize("target", ["v5e-4", "v5p-8"])
def test_tiny_prefill_runs_the_kernel_and_decoding_does_not(target):
  prefill, step = _prefill_and_step(CFG, target, windows=1)
  assert KERNEL in prefill.as_text()  # the encoder's windows and the prompt
  assert KERNEL not in step.as_text()  # one query a row: XLA


def test_tiny_packed_training_step_runs_the_kernel_both_ways():
  from configs import stage5

  cfg = stage5.get_config()
  cfg.per_device_batch, cfg.accum_steps, cfg.data.max_windows = 1, 2, 1
  hlo = _train_step(cfg, CFG, "v5p-8", length=256).as_text()
  assert "splash_mha_fwd_segmented" in hlo and "splash_mha_dkv_segmented" in hlo  # forward and backward


@pytest.mark.slow
@pytest.mark.parametrize("target", ["v5e-4", "v5p-8"])
def test_ten_minute_prefill_at_full_size_runs_the_kernel_and_fits(target):
  """The released AF3 in bfloat16, 10 minutes of audio (20 windows, 15,036 prompt tokens padded to
  16,384), split by heads over the slice."""
  prefill, step = _prefill_and_step(AF3Config(), target, windows=20)
  assert KERNEL in prefill.as_text()
  _fits(prefill, target, "10-minute prefill")
  _fits(step, target, "decode step after it")


@pytest.mark.slow
def test_stage5_training_step_at_full_size_runs_the_kernel_and_fits():
  """configs/stage5.py as it stands (all weights trained, 2 packed rows of 8,192 tokens and 20 windows
  a device, 8 accumulated, fsdp over the slice) at the released AF3 size, on a v5p-8. No v5e slice
  holds it (bench/RESULTS.md): its temporaries alone pass a v5e chip's HBM."""
  from configs import stage5

  cfg = stage5.get_config()
  compiled = _train_step(cfg, AF3Config(), "v5p-8", length=cfg.data.max_length)
  assert KERNEL in compiled.as_text()
  _fits(compiled, "v5p-8", "stage-5 step")
