"""`af3_jax.targets`: target names, compile-only devices, and the platform a traced program sees."""

import jax
import jax.numpy as jnp
import pytest

from af3_jax import sharding, targets


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
