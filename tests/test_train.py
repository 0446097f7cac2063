"""train.py end to end on a tiny checkpoint (CPU, float32): the loss falls on a small manifest, a run
stopped by SIGTERM resumes to the same per-step losses, a corrupt file is skipped, the export loads in
transformers with our logits, and every stage config compiles with its trainable set."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

import af3_jax
from af3_jax import optim, train_lib, trainer
from configs import tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device per run


@pytest.fixture(scope="module")
def run_setup(gqa_ckpt, tokenizer_dir, tmp_path_factory):
  """(checkpoint with tokenizer, manifest of 8 short clips with answers, manifest with a corrupt file)."""
  root = tmp_path_factory.mktemp("train")
  model = root / "model"
  shutil.copytree(gqa_ckpt.hf, model)
  for f in tokenizer_dir.iterdir():
    shutil.copy(f, model)
  rng = np.random.default_rng(0)
  items = []
  for i in range(8):
    path = root / f"clip{i}.wav"
    sf.write(path, 0.3 * rng.standard_normal(int((1.0 + i / 4) * 16000)), 16000)
    answer = ["A dog barking.", "Music plays.", "Someone speaks.", "Rain falls."][i % 4]
    items.append({"id": f"c{i}", "sound": str(path),
                  "conversations": [{"from": "human", "value": "<sound>\nWhat is in this audio?"},
                                    {"from": "gpt", "value": answer}]})
  manifest = root / "train.json"
  manifest.write_text(json.dumps(items))
  (root / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
  corrupt = root / "corrupt.json"
  corrupt.write_text(json.dumps(items[:3] + [{**items[3], "id": "bad", "sound": str(root / "broken.wav")}]))
  return model, manifest, corrupt


def train(workdir, model, manifest, *extra, wait=True, config="configs/tiny.py"):
  cmd = [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}",
         f"--config.init_from={model}", f"--config.data.train={manifest}", *extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records}, records


def test_loss_falls_and_the_export_loads_in_transformers(run_setup, tmp_path):
  model, manifest, _ = run_setup
  code, out, err = train(tmp_path / "run", model, manifest, "--config.total_steps=16")
  assert code == 0, err[-2000:]
  by_step, records = losses(tmp_path / "run")
  assert sorted(by_step) == list(range(1, 17))
  first, last = np.mean([by_step[s] for s in range(1, 5)]), np.mean([by_step[s] for s in range(13, 17)])
  assert last < 0.7 * first, (first, last)
  assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped"} <= set(records[0])
  from test_tensorboard import read_scalars

  (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
  logged = {s: v for s, tag, v in read_scalars(events) if tag == "loss"}
  assert logged == pytest.approx(by_step, rel=1e-6)  # the same losses as metrics.jsonl
  assert "trainable" in out and "compiled train step" in out

  export = tmp_path / "hf"
  run = subprocess.run([sys.executable, "-m", "convert.to_hf", f"--workdir={tmp_path / 'run'}", f"--out={export}",
                        "--dtype=float32"], cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  ours = af3_jax.from_pretrained(tmp_path / "run" / "model", dtype=jnp.float32)
  ref = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(export).eval()
  ids = np.random.default_rng(1).integers(0, 290, (1, 12))
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids)).logits.numpy()
  got = np.asarray(ours(input_ids=ids))
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def stop_and_resume(run_setup, tmp_path, save_every: int, stop):
  """Runs 6 steps straight, and again stopped by `stop(proc)` after 3 logged steps and then rerun;
  returns (the stopped process's stderr, its return code, straight losses, resumed losses)."""
  model, manifest, _ = run_setup
  args = ("--config.total_steps=6", f"--config.save_every={save_every}")
  code, _, err = train(tmp_path / "straight", model, manifest, *args)
  assert code == 0, err[-2000:]
  proc = train(tmp_path / "cut", model, manifest, *args, wait=False)
  metrics = tmp_path / "cut" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.05)
  stop(proc)
  _, stop_err = proc.communicate(timeout=300)
  code, out, err = train(tmp_path / "cut", model, manifest, *args)
  assert code == 0 and "resumed from step" in out, err[-2000:]
  # The resumed run appends to metrics.jsonl; later lines win for repeated steps.
  return stop_err, proc.returncode, losses(tmp_path / "straight")[0], losses(tmp_path / "cut")[0]


def test_sigterm_then_resume_matches_an_uninterrupted_run(run_setup, tmp_path):
  err, code, straight, cut = stop_and_resume(run_setup, tmp_path, 2, lambda p: p.send_signal(signal.SIGTERM))
  assert code == 0 and "stopped at step" in err, err[-2000:]
  assert sorted(cut) == sorted(straight) == list(range(1, 7))
  np.testing.assert_allclose([cut[s] for s in range(1, 7)], [straight[s] for s in range(1, 7)], rtol=1e-6)


def test_a_corrupt_file_is_skipped_and_counted(run_setup, tmp_path):
  model, _, corrupt = run_setup
  code, _, err = train(tmp_path / "run", model, corrupt, "--config.total_steps=6")
  assert code == 0, err[-2000:]
  _, records = losses(tmp_path / "run")
  assert sum(r["skipped"] for r in records) >= 1
  assert "broken.wav" in err


def test_bad_input_is_one_line(run_setup, tmp_path):
  model, manifest, _ = run_setup
  code, _, err = train(tmp_path / "run", model, tmp_path / "missing.json")
  assert code == 1 and "missing.json: not a readable JSON manifest" in err
  assert "Traceback" not in err


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
  graphdef, params, frozen = trainer.prepare(model, cfg)
  assert set(params) == expected
  if stage == "4":
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert all("lora_" in jax.tree_util.keystr(path) for path, _ in leaves)
  mesh = model.mesh
  optimizer = optim.make_optimizer(1e-3, 10)
  with jax.set_mesh(mesh):
    state = train_lib.init_state(params, optimizer, mesh)
    step_fn = train_lib.jit_train_step(graphdef, optimizer, state, frozen, mesh)
    batch = {"input_ids": jnp.zeros((1, 16), jnp.int32), "attention_mask": jnp.ones((1, 16), jnp.int32),
             "labels": jnp.ones((1, 16), jnp.int32)}
    assert step_fn.lower(state, frozen, batch).compile() is not None



def test_lora_run_exports_a_peft_adapter(run_setup, gqa_ckpt, tmp_path):
  """Stage 4's LoRA on the tiny model: peft applies the exported adapter to the base torch model and
  gives the logits of our merged model."""
  peft = pytest.importorskip("peft")
  model, manifest, _ = run_setup
  code, _, err = train(tmp_path / "run", model, manifest, "--config.total_steps=3", config="configs/tiny.py:4")
  assert code == 0, err[-2000:]
  out = tmp_path / "adapter"
  run = subprocess.run([sys.executable, "-m", "convert.to_hf", f"--workdir={tmp_path / 'run'}", f"--out={out}",
                        "--adapter-only"], cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  base = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(gqa_ckpt.hf).eval()
  ids = np.random.default_rng(2).integers(0, 290, (1, 12))
  with torch.no_grad():
    before = base(input_ids=torch.tensor(ids)).logits.numpy()
    expected = peft.PeftModel.from_pretrained(base, out).eval()(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(expected - before).max() > 1e-3 * np.abs(before).max()  # training moved the adapter
  got = np.asarray(af3_jax.from_pretrained(tmp_path / "run" / "model", dtype=jnp.float32)(input_ids=ids))
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_two_processes_match_one(run_setup, tmp_path):
  """train.py as 2 processes (one CPU device each, gloo) gives the per-step losses of 1 process with 2
  devices; only process 0 writes metrics, and both processes write the final model together."""
  portpicker = pytest.importorskip("portpicker")
  model, manifest, _ = run_setup
  args = ("--config.total_steps=3", "--config.save_every=100")
  cmd = lambda workdir: [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
                         f"--config.init_from={model}", f"--config.data.train={manifest}", *args]
  one = subprocess.Popen(cmd(tmp_path / "one"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(cmd(tmp_path / "two"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                                 "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  try:
    results = [p.communicate(timeout=240) for p in (one, *procs)]
  finally:
    for p in (one, *procs):
      p.kill()
  for p, (_, err) in zip((one, *procs), results):
    assert p.returncode == 0, err[-2000:]
  single, _ = losses(tmp_path / "one")
  multi, _ = losses(tmp_path / "two")
  lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3 and sorted(multi) == sorted(single) == [1, 2, 3]  # process 0 alone logged
  np.testing.assert_allclose([multi[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)], rtol=1e-5)
  a = af3_jax.from_pretrained(tmp_path / "one" / "model", dtype=jnp.float32)
  b = af3_jax.from_pretrained(tmp_path / "two" / "model", dtype=jnp.float32)
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
  assert not list((tmp_path / "two").glob(".model*"))  # no temporary folder left behind


def test_a_kill_mid_run_leaves_a_usable_checkpoint(run_setup, tmp_path):
  """SIGKILL while checkpoints are being written every step (asynchronously): the rerun resumes from
  the latest complete one and ends with the losses of an uninterrupted run."""
  _, _, straight, killed = stop_and_resume(run_setup, tmp_path, 1, lambda p: p.kill())
  np.testing.assert_allclose([killed[s] for s in range(1, 7)], [straight[s] for s in range(1, 7)], rtol=1e-6)


def test_a_non_finite_loss_stops_without_saving_it(run_setup, tmp_path):
  model, manifest, _ = run_setup
  code, _, err = train(tmp_path / "run", model, manifest, "--config.optim.lr=1e30", "--config.total_steps=8",
                       "--config.save_every=1")
  assert code == 1 and "non-finite loss" in err
  bad_step = int(err.split("non-finite loss")[1].split("at step ")[1].split(";")[0])
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < bad_step
  assert not (tmp_path / "run" / "model").exists()
