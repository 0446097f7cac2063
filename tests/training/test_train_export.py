"""train.py's saved steps used afterwards (tiny checkpoint, CPU, float32): a LoRA run's export as a peft
adapter, the export of any saved step loading in transformers (or peft) with our logits at that step, a
step not saved refused in one line, and an unfinished run's latest step as the next stage's init_from."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT
from helpers.parity import assert_close
from programs import ENV, saved_params, to_hf, train

import af3_jax
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lora_run(run_setup, tmp_path_factory):
  """A finished 3-step run of stage 4's LoRA that saved every step: checkpoints 1, 2 and 3, and
  model/ and adapter/ at step 3."""
  model, manifest, _ = run_setup
  workdir = tmp_path_factory.mktemp("lora") / "run"
  code, _, err = train(workdir, model, manifest, "--config.total_steps=3", "--config.save_every=1",
                       config="configs/tiny.py:4")
  assert code == 0, err[-2000:]
  return workdir


def peft_logits(base_dir, adapter_dir, ids) -> tuple[np.ndarray, np.ndarray]:
  """transformers' logits for `ids` without and with peft's adapter from `adapter_dir`."""
  peft = pytest.importorskip("peft")
  base = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(base_dir).eval()
  with torch.no_grad():
    before = base(input_ids=torch.tensor(ids)).logits.numpy()
    return before, peft.PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=torch.tensor(ids)).logits.numpy()


def test_lora_run_exports_a_peft_adapter(gqa_ckpt, lora_run, tmp_path):
  """Stage 4's LoRA on the tiny model: peft applies the exported adapter to the base torch model and
  gives the logits of our merged model."""

  out = to_hf(lora_run, tmp_path / "adapter", "--adapter-only")
  ids = np.random.default_rng(2).integers(0, 290, (1, 12))
  before, expected = peft_logits(gqa_ckpt.hf, out, ids)
  assert np.abs(expected - before).max() > 1e-3 * np.abs(before).max()  # training moved the adapter
  got = np.asarray(af3_jax.from_pretrained(lora_run / "model", dtype=jnp.float32)(input_ids=ids))
  assert_close(got, expected)


def files_of(folder) -> dict:
  """Size and modification time of every file and folder under `folder`."""
  return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_export_of_a_saved_step_is_our_model_at_that_step(run_setup, gqa_ckpt, lora_run, tmp_path):
  """--step 2 of the LoRA run, which is not its finished model: the export's logits in transformers,
  and peft's over the base with the --adapter-only export, equal our model from the run's init_from
  with LoRA added and step 2's LoRA weights put in (applied unmerged). The workdir is only read."""

  from af3_jax.checkpoints import lora
  from configs import tiny

  before = files_of(lora_run)
  hf = to_hf(lora_run, tmp_path / "hf", "--step=2", "--dtype=float32")
  adapter = to_hf(lora_run, tmp_path / "adapter", "--step=2", "--adapter-only")
  assert files_of(lora_run) == before

  cfg = tiny.get_config("4")
  base = af3_jax.from_pretrained(run_setup[0], dtype=jnp.float32)
  module = base.module()
  lora.add(module, lora.Spec(cfg.lora.rank, cfg.lora.alpha), jax.random.key(1))
  graphdef, adapted, rest = nnx.split(module, nnx.LoRAParam, ...)
  nnx.replace_by_pure_dict(adapted, saved_params(lora_run, 2))
  ours = af3_jax.Model(base.config, graphdef, nnx.merge_state(adapted, rest), base.mesh)
  ids = np.random.default_rng(3).integers(0, 290, (1, 12))
  expected = np.asarray(ours(input_ids=ids))

  exported = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(hf).eval()
  with torch.no_grad():
    assert_close(exported(input_ids=torch.tensor(ids)).logits.numpy(), expected)
  untrained, with_adapter = peft_logits(gqa_ckpt.hf, adapter, ids)
  assert_close(with_adapter, expected)
  final = np.asarray(af3_jax.from_pretrained(lora_run / "model", dtype=jnp.float32)(input_ids=ids))
  for other in (untrained, final):  # step 2 is neither where the run started nor where it ended
    assert np.abs(other - expected).max() > 1e-3 * np.abs(expected).max()


def test_export_of_a_step_not_saved_is_one_line_naming_the_saved_ones(lora_run, tmp_path):
  run = subprocess.run([sys.executable, "-m", "convert.to_hf", f"--workdir={lora_run}", f"--out={tmp_path / 'hf'}",
                        "--step=7"], cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert run.returncode == 1, run.stderr[-2000:]
  assert run.stderr.strip() == f"error: {lora_run}: no saved step 7; saved steps: 1, 2, 3"
  assert not list(tmp_path.iterdir())  # nothing written, not even a temporary folder


def test_init_from_an_unfinished_workdir_starts_from_its_latest_step(run_setup, lora_run, tmp_path):
  """The LoRA run as if stopped after step 2 (checkpoints 1 and 2, no model/ yet) is the init_from of
  a projector stage: that stage's frozen decoder kernels are the init checkpoint's plus step 2's LoRA
  (scale * a @ b, read from the checkpoint with orbax alone), and it records the step it started from."""
  from configs import tiny

  model, manifest, _ = run_setup
  unfinished = tmp_path / "unfinished"
  shutil.copytree(lora_run, unfinished)
  for name in ("model", "adapter", "checkpoints/3"):
    shutil.rmtree(unfinished / name)
  code, _, err = train(tmp_path / "next", unfinished, manifest, "--config.total_steps=1", config="configs/tiny.py:1")
  assert code == 0, err[-2000:]
  settings = json.loads((tmp_path / "next" / "train_config.json").read_text())
  assert settings["init_checkpoint"] == str(unfinished / "checkpoints" / "2")

  cfg = tiny.get_config("4")
  scale = cfg.lora.alpha / cfg.lora.rank
  start = af3_jax.from_pretrained(model, dtype=jnp.float32).state["language_model"]["layers"]["self_attn"]["q_proj"]
  trained = af3_jax.from_pretrained(tmp_path / "next" / "model", dtype=jnp.float32).state
  got = np.asarray(trained["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"][...])
  for step in (2, 1):
    q = saved_params(lora_run, step)["language_model"]["layers"]["self_attn"]["q_proj"]
    merged = np.asarray(start["kernel"][...]) + scale * np.einsum("lir,lro->lio", q["lora_a"], q["lora_b"])
    if step == 2:
      np.testing.assert_allclose(got, merged, rtol=1e-5, atol=1e-6)
    else:  # an earlier step would be told apart
      assert np.abs(got - merged).max() > 1e-4 * np.abs(got).max()
