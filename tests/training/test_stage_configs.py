"""The stage configs' train steps, lowered and compiled in this process on the tiny checkpoint: stage
5's remat shrinks the compiled step, and each stage compiles with its trainable set."""


import jax
import jax.numpy as jnp
import pytest
from helpers import ROOT

import af3_jax
from af3_jax.checkpoints import lora
from af3_jax.training import optimizer as optim, step as train_step
from configs import tiny


def test_the_stage_configs_remat_reaches_the_compiled_step(gqa_ckpt):
  """Stage 5's remat policy, built the way train.py builds it, shrinks the compiled step's temporaries
  against the same config with remat "none"."""
  from af3_jax.training import setup as run_setup
  from af3_jax import sharding
  from configs import stage5

  mesh = sharding.single_device_mesh()
  temporaries = {}
  for remat in (stage5.get_config().remat, "none"):
    cfg = stage5.get_config()
    cfg.remat, cfg.accum_steps = remat, 1
    _, frozen, state, step_fn = run_setup.build(cfg, run_setup.load(cfg, str(gqa_ckpt.hf), mesh), mesh, total_steps=10)
    t = 1024
    batch = {"input_ids": jnp.zeros((2, t), jnp.int32), "attention_mask": jnp.ones((2, t), jnp.int32),
             "labels": jnp.ones((2, t), jnp.int32)}
    with jax.set_mesh(mesh):
      temporaries[remat] = step_fn.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes
  assert stage5.get_config().remat == "nothing_saveable"
  assert temporaries["nothing_saveable"] < 0.7 * temporaries["none"], temporaries


@pytest.mark.parametrize("stage, expected", [
    ("1", {"multi_modal_projector"}),
    ("2", {"audio_tower", "multi_modal_projector"}),
    ("3", {"audio_tower", "multi_modal_projector", "language_model", "lm_head"}),
    ("4", {"language_model"}),
    ("5", {"audio_tower", "multi_modal_projector", "language_model", "lm_head"}),
])
def test_each_stage_compiles_with_its_trainable_set(gqa_ckpt, stage, expected):
  cfg = tiny.get_config(stage)
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  adapter = lora.Spec(cfg.lora.rank, cfg.lora.alpha) if cfg.trainable == "lora" else None
  graphdef, params, frozen = train_step.prepare(model, cfg.trainable, adapter, cfg.seed)
  assert set(params) == expected
  if stage == "4":
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert all("lora_" in jax.tree_util.keystr(path) for path, _ in leaves)
  mesh = model.mesh
  optimizer = optim.make_optimizer(1e-3, 10)
  with jax.set_mesh(mesh):
    state = train_step.init_state(params, optimizer, mesh)
    step_fn = train_step.jit_train_step(graphdef, optimizer, state, frozen, mesh)
    batch = {"input_ids": jnp.zeros((1, 16), jnp.int32), "attention_mask": jnp.ones((1, 16), jnp.int32),
             "labels": jnp.ones((1, 16), jnp.int32)}
    memory = step_fn.lower(state, frozen, batch).compile().memory_analysis()
  # The donated state's buffers become the outputs: this stage's weights and both AdamW moments are
  # updated in place, and nothing beyond the state is (the frozen weights are only read).
  weights = sum(x.nbytes for x in jax.tree.leaves(state.params))
  assert 3 * weights <= memory.alias_size_in_bytes <= sum(x.nbytes for x in jax.tree.leaves(state))


def test_compile_only_plans_memory_from_the_config_alone(gqa_ckpt, tmp_path):
  """`train.py --compile_only` reads only config.json, compiles every length bucket on the 8 devices and
  writes memory.json; its plan is the one XLA makes for the same step with the real weights."""
  import json
  import shutil
  import subprocess
  import sys

  from af3_jax.training import setup as run_setup
  from af3_jax import sharding
  from af3_jax.training import pipeline

  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(gqa_ckpt.hf / "config.json", bare)
  run = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py:5", f"--config.init_from={bare}",
                        f"--workdir={tmp_path / 'w'}", "--compile_only"], capture_output=True, text=True,
                       cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  plan = json.loads((tmp_path / "w" / "memory.json").read_text())
  assert [p["length"] for p in plan] == [256, 512, 1024] and "peak" in run.stdout
  assert all(p["peak_gib"] >= p["arguments_gib"] > 0 and p["temporaries_gib"] > 0 for p in plan)
  assert plan[0]["temporaries_gib"] < plan[-1]["temporaries_gib"]

  cfg = tiny.get_config("5")  # the same step from the loaded checkpoint, at the first bucket
  mesh = sharding.make_mesh(cfg.mesh)
  _, frozen, state, step_fn = run_setup.build(cfg, run_setup.load(cfg, str(gqa_ckpt.hf), mesh), mesh, total_steps=1000)
  rows = cfg.per_device_batch * jax.device_count()
  template = pipeline.batch_shapes(rows, cfg.data.max_windows, 256, packed=cfg.data.packing)
  batch = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in template.items()}
  with jax.set_mesh(mesh):
    batch = jax.device_put(batch, sharding.batch_shardings(batch, mesh))
    memory = step_fn.lower(state, frozen, batch).compile().memory_analysis()
  assert plan[0]["temporaries_gib"] == memory.temp_size_in_bytes / 2**30
  assert plan[0]["arguments_gib"] == memory.argument_size_in_bytes / 2**30


def test_stage5_at_full_size_plans_under_72_gib(tmp_path):
  """The released AF3's config alone, stage 5 at its upstream batch (2 rows x 8192 tokens x 20 windows per
  device, 8 accumulated) on the 8 fake devices: the compiled step fits an 80 GB card with room to spare."""
  import json
  import subprocess
  import sys

  from af3_jax.config import AF3Config

  (tmp_path / "config.json").write_text(json.dumps(AF3Config().to_hf_dict()))
  run = subprocess.run([sys.executable, "train.py", "--config=configs/stage5.py", f"--config.init_from={tmp_path}",
                        "--config.data.length_buckets=(8192,)", f"--workdir={tmp_path / 'w'}", "--compile_only"],
                       capture_output=True, text=True, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  [plan] = json.loads((tmp_path / "w" / "memory.json").read_text())
  assert plan["length"] == 8192 and plan["peak_gib"] <= 72, plan
