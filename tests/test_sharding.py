"""Sharding on 8 fake CPU devices, and the full-size AF3 checked abstractly with jax.eval_shape."""

import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import audio_tokens, random_features, random_text
from helpers.parity import assert_close, flat
from helpers.sharding import assert_specs_divide, mesh_222

import af3_jax
from af3_jax import sharding
from af3_jax.checkpoints import names
from jax.sharding import PartitionSpec as P
from af3_jax.checkpoints.pretrained import abstract_model


def sdy_sharding(spec: P, rank: int) -> str:
  """`spec` as Shardy prints an argument's sharding, one set of mesh axes per dim: `[{"data", "fsdp"}, {}]`."""
  dims = tuple(spec) + (None,) * (rank - len(spec))
  axes = lambda d: (d,) if isinstance(d, str) else (d or ())
  return "[" + ", ".join("{" + ", ".join(f'"{a}"' for a in axes(d)) + "}" for d in dims) + "]"


def test_sharded_forward_equals_unsharded(ckpt):
  rng = np.random.default_rng(0)
  tiny = ckpt.tiny
  feats, fmask = random_features(rng, [3000, 900])
  width = 3 + audio_tokens(3000) + 3
  ids = np.stack([np.concatenate([random_text(rng, tiny, 3), np.full(audio_tokens(n), tiny.audio_token_id),
                                  random_text(rng, tiny, width - 3 - audio_tokens(n))]) for n in (3000, 900)])
  batch = dict(input_ids=np.concatenate([ids, ids]), input_features=np.concatenate([feats, feats]),
               input_features_mask=np.concatenate([fmask, fmask]))
  single = af3_jax.from_pretrained(ckpt.hf, dtype=jnp.float32)
  sharded = af3_jax.from_pretrained(ckpt.hf, dtype=jnp.float32, mesh=mesh_222())
  assert len(sharded.state["lm_head"]["kernel"][...].sharding.device_set) == 8
  assert_specs_divide(jax.tree.map(lambda x: x.sharding, sharded.state), sharded.state)
  assert_close(sharded(**batch), single(**batch), rtol=1e-5)


@pytest.fixture(scope="module")
def full_abstract():
  cfg = af3_jax.AF3Config()
  return abstract_model(cfg, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16, mesh=mesh_222())


def test_full_config_parameter_count(full_abstract):
  _, state, _ = full_abstract
  shapes = flat(state)
  count = lambda prefix: sum(math.prod(v.shape) for k, v in shapes.items() if k[0] == prefix)
  assert sum(math.prod(v.shape) for v in shapes.values()) == 8_267_215_360
  assert count("audio_tower") == 636_968_960
  assert count("multi_modal_projector") == 17_439_744
  assert count("language_model") == 7_069_214_208
  assert count("lm_head") == 543_592_448


def test_full_config_specs_divide_on_222_mesh(full_abstract):
  _, state, shardings = full_abstract
  assert_specs_divide(shardings, state)


def test_full_config_matches_upstream_shapes(full_abstract):
  """Every tensor of transformers' full-size model (built on the meta device) maps onto ours."""
  torch = pytest.importorskip("torch")
  import transformers

  cfg = transformers.AudioFlamingo3Config(**af3_jax.AF3Config().to_hf_dict())
  with torch.device("meta"):
    ref = transformers.AudioFlamingo3ForConditionalGeneration(cfg)
  _, state, _ = full_abstract
  ours = flat(state)
  seen = set()
  for key, tensor in ref.state_dict().items():
    path, layer, transform = names.param_path(names.canonical(key, names.HF_PREFIXES))
    shape = ours[path].shape[1:] if layer is not None else ours[path].shape
    assert names.torch_to_ours(np.empty(tuple(tensor.shape), np.int8), transform).shape == shape, key
    seen.add(path)
  assert seen == set(ours)


@pytest.mark.parametrize("trainable", ["projector", "all"])
def test_full_size_train_step_lowers_on_a_222_mesh(full_abstract, trainable):
  """The 8B training step (bf16 compute, float32 trainable copies, AdamW, remat) lowers with explicit
  shardings on 8 fake devices: shapes only, no memory."""
  from af3_jax.training import optimizer as optim, step as train_step

  graphdef, state, shardings = full_abstract
  mesh = mesh_222()
  placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  module = nnx.merge(graphdef, placed)
  graphdef, params, frozen = train_step.split(module, trainable)
  optimizer = optim.make_optimizer(1e-5, 100)
  abstract_state = jax.eval_shape(lambda p: train_step.init_state(p, optimizer, mesh), params)
  rows, length = 4, 1024
  batch = {"input_ids": jax.ShapeDtypeStruct((rows, length), jnp.int32),
           "attention_mask": jax.ShapeDtypeStruct((rows, length), jnp.int32),
           "labels": jax.ShapeDtypeStruct((rows, length), jnp.int32),
           "input_features": jax.ShapeDtypeStruct((rows, 128, 3000), jnp.float32),
           "input_features_mask": jax.ShapeDtypeStruct((rows, 3000), jnp.int32)}
  batch_sharding = sharding.batch_shardings(batch, mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding[k]) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    step = train_step.jit_train_step(graphdef, optimizer, abstract_state, frozen, mesh)
    lowered = step.lower(abstract_state, frozen, batch)
  # The trained copies come out of the step laid out as the model's own weights are (the shardings
  # `abstract_model` gave them): no silent re-layout, no replicated float32 copy of a sharded weight.
  outs = jax.tree.leaves(lowered.out_info[0].params)
  ins = jax.tree.leaves(params)
  assert len(outs) == len(ins) > 0
  assert all(o.sharding == i.sharding for o, i in zip(outs, ins)), "the train step re-lays out its state"
  assert any(i.sharding.spec != P() for i in ins)  # the rules did shard the trainable weights
  # The program handed to XLA declares the mesh, and its arguments carry the shardings asked for: state,
  # frozen weights and batch. Only sharded ones are counted: lowering drops unused (replicated scalar) inputs.
  hlo = lowered.as_text()
  assert 'sdy.mesh @mesh = <["data"=2, "fsdp"=2, "tensor"=2]>' in hlo
  args = hlo[hlo.index("func.func public @main("):].split(") -> (")[0]
  carried = Counter(re.findall(r"#sdy\.sharding<@mesh, (\[[^>]*\])>", args))
  asked = jax.tree.leaves((train_step.state_shardings(abstract_state, mesh), sharding.state_shardings(frozen, mesh),
                           batch_sharding))
  avals = jax.tree.leaves((abstract_state, frozen, batch))
  expected = Counter(sdy_sharding(s.spec, len(a.shape)) for s, a in zip(asked, avals, strict=True))
  sharded_only = lambda counts: {k: n for k, n in counts.items() if '"' in k}  # names a mesh axis
  assert sharded_only(carried) == sharded_only(expected)
