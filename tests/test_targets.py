"""`af3_jax.targets`: target names, compile-only devices, and the platform a traced program sees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import af3_jax
from af3_jax import sharding, targets
from af3_jax.checkpoints.pretrained import init_random
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig
from af3_jax.inference.engine import Engine, Request
from af3_jax.models import attention
from af3_jax.models.whisper import tokens_per_window


@pytest.mark.parametrize("name, platform, count", [
    ("h100", "gpu", 1), ("h200-8", "gpu", 8), ("a100-2", "gpu", 2),
    ("v5e-4", "tpu", 4), ("v6e-8", "tpu", 8), ("v5p-8", "tpu", 4), ("v4-16", "tpu", 8),
])
def test_names(name, platform, count):
  t = targets.parse(name)
  assert (t.platform, t.count) == (platform, count)
  assert t.hbm_bytes > 15 * targets.GIB


@pytest.mark.parametrize("name", ["h300", "v5p-6", "v5e-3", "h100-0", ""])
def test_unknown_names_say_what_is_known(name):
  with pytest.raises(ValueError, match="unknown target|no v5"):
    targets.parse(name)


def test_platform_without_a_mesh_is_the_hosts():
  assert targets.platform() == "cpu"
  mesh = sharding.single_device_mesh()
  seen = []
  with jax.set_mesh(mesh):
    jax.jit(lambda x: seen.append(targets.platform()) or x).lower(jnp.ones(2))
  assert seen == ["cpu"] and targets.platform(mesh) == "cpu"


@pytest.mark.accelerator
@pytest.mark.parametrize("name, kind", [("h100-2", "H100"), ("a100", "A100"), ("v5e-4", "v5 lite"), ("v5p-8", "v5")])
def test_a_program_traced_for_a_target_sees_its_platform(name, kind):
  devices = targets.devices(name)
  assert len(devices) == targets.parse(name).count and kind in devices[0].device_kind
  mesh = sharding.make_mesh((1, len(devices), 1), devices)
  seen = []
  x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=jax.NamedSharding(mesh, jax.P()))
  with jax.set_mesh(mesh):
    compiled = jax.jit(lambda x: seen.append(targets.platform()) or x * 2).lower(x).compile()
  assert seen == [targets.parse(name).platform] and compiled.memory_analysis() is not None


def test_every_entry_point_traces_attention_under_the_models_mesh(monkeypatch):
  """Attention picks its backend from the mesh it is traced under (`targets.platform`), so each public
  path onto the devices traces under its model's mesh: `Model.__call__`, `generate`, `generate_stream`
  and the engine's prefill and decode step (train.py and the benchmarks set it around the train step).
  Each path gets a config no other test or path uses (its own vocabulary), so that its programs are
  traced here, not taken from jit's cache (generate and generate_stream share theirs)."""
  def config(vocab: int) -> AF3Config:
    return AF3Config(encoder=EncoderConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16,
                                          max_source_positions=16),
                    decoder=DecoderConfig(vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2,
                                          num_kv_heads=1, head_dim=8, intermediate_size=24),
                    audio_token_id=vocab - 1)

  cfg = config(96)
  seen = []
  traced = attention.attention
  monkeypatch.setattr(attention, "attention", lambda *a, **kw: seen.append(jax.sharding.get_abstract_mesh()) or traced(*a, **kw))
  frames = cfg.encoder.mel_frames
  audio = {"input_features": np.zeros((1, cfg.encoder.num_mel_bins, frames), np.float32),
           "input_features_mask": np.ones((1, frames), np.int32)}
  ids = np.concatenate([np.ones(3, int), np.full(tokens_per_window(cfg.encoder), cfg.audio_token_id)])[None]
  paths = {
      "Model.__call__": lambda model, ids: model(input_ids=ids, **audio),
      "generate": lambda model, ids: af3_jax.generate(model, {"input_ids": ids, **audio}, 2),
      "generate_stream": lambda model, ids: list(af3_jax.generate_stream(model, {"input_ids": ids, **audio}, 2)),
      "engine": lambda model, ids: list(Engine(model, max_slots=1, max_len=64).map(
          [Request({"input_ids": ids[0], **audio}, 2)], lambda r: r)),
  }
  for i, (name, run) in enumerate(paths.items()):
    own = config(96 + i)
    model = init_random(own, dtype=jnp.float32)
    seen.clear()
    run(model, np.where(ids == cfg.audio_token_id, own.audio_token_id, ids))
    assert seen, f"{name} traced no attention (a cached program: use a config of its own)"
    assert all(m == model.mesh.abstract_mesh for m in seen), f"{name}: {set(map(str, seen))}"
