"""The engine's programs compiled for an H200 on this CPU machine (deviceless, `af3_jax.targets`): a
dispatch of 8 decode steps carries the cache through its loop where it lies, as a single step does (no
copy of the cache, and neither has room for one in its temporaries), and inserting a batch of prefilled
requests writes their rows into the donated cache in place. Needs the `accelerators` extra and JAX_PLATFORMS=cpu
(`pytest -m accelerator`)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from accelerators import abstract_model, compile_for
from helpers.tiny import TINY

from af3_jax.inference import slots

pytestmark = pytest.mark.accelerator

CFG = TINY[0].config()  # the gqa shape (helpers.tiny)
SLOTS, LENGTH, WINDOW = 8, 4096, 1024


def test_multi_step_dispatches_and_batched_inserts_keep_the_cache_in_place():
  model = abstract_model("h200", CFG, jnp.bfloat16)
  whole = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec())
  on_mesh = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), tree)
  state = on_mesh(jax.eval_shape(lambda: slots.empty_fn(CFG, batch=SLOTS, length=LENGTH, dtype=jnp.bfloat16)))
  k = state.cache.k
  cache = rf"bf16\[{','.join(map(str, k.shape))}\]"
  temps = {}
  for steps in (1, 8):
    program = compile_for(model.mesh, slots.decode_fn, model.graphdef, model.state, state, np.ones(SLOTS, np.int32),
                          window=WINDOW, steps=steps)
    assert not re.search(rf"= {cache}\S* copy\(", program.hlo), f"{steps} steps copy the cache"
    temps[steps] = program.memory["temporaries_gib"] * 2**30
  # One step (no loop) or eight (a while loop carrying the cache): no room for a copy of the cache's k or v.
  assert max(temps.values()) < k.size * k.dtype.itemsize // 2
  rows, prompt = 4, 256
  prefix = on_mesh(slots.Prefix(
      k=jax.ShapeDtypeStruct((CFG.decoder.num_layers, rows, prompt) + k.shape[3:], jnp.bfloat16),
      v=jax.ShapeDtypeStruct((CFG.decoder.num_layers, rows, prompt) + k.shape[3:], jnp.bfloat16),
      length=jax.ShapeDtypeStruct((rows,), jnp.int32), need=jax.ShapeDtypeStruct((rows,), jnp.int32),
      token=jax.ShapeDtypeStruct((rows,), jnp.int32), seen=jax.ShapeDtypeStruct((rows, 300), bool),
      rows=jax.tree.map(lambda a: jax.ShapeDtypeStruct((rows,), a.dtype), state.rows),
      key=jax.ShapeDtypeStruct((rows,), state.key.dtype), eos=jax.ShapeDtypeStruct((rows, slots.EOS_IDS), jnp.int32)))
  program = compile_for(model.mesh, slots.insert_fn, state, prefix, np.arange(rows, dtype=np.int32))
  assert not re.search(rf"= {cache}\S* copy\(", program.hlo), "the insert copies the cache"
  assert program.memory["temporaries_gib"] * 2**30 < k.size * k.dtype.itemsize // 8
