"""train.py end to end on a tiny checkpoint (CPU, float32): the loss falls on a small manifest and the
export of the finished model loads in transformers with our logits, a run stopped by SIGTERM or a kill
(one process, or one of two) resumes to the same per-step losses, a rerun goes on from the last step, 2
processes match 1, a non-finite loss stops the run unsaved. Bad input: test_train_input.py; saved steps
exported or trained from: test_train_export.py."""

import json
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT
from helpers.events import read_scalars
from helpers.parity import assert_close
from helpers.processes import finish, start_processes
from programs import ENV, losses, saved_params, to_hf, train, train_args, wait_for_steps

import af3_jax
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_loss_falls_and_the_export_loads_in_transformers(run_setup, tmp_path):
  model, manifest, _ = run_setup
  code, out, err = train(tmp_path / "run", model, manifest, "--config.total_steps=16")
  assert code == 0, err[-2000:]
  by_step, records = losses(tmp_path / "run")
  assert sorted(by_step) == list(range(1, 17))
  first, last = np.mean([by_step[s] for s in range(1, 5)]), np.mean([by_step[s] for s in range(13, 17)])
  assert last < 0.7 * first, (first, last)
  assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped", "packing_efficiency"} <= set(records[0])
  assert all(0 < r["packing_efficiency"] <= 1 for r in records)

  (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
  logged = {s: v for s, tag, v in read_scalars(events) if tag == "loss"}
  assert logged == pytest.approx(by_step, rel=1e-6)  # the same losses as metrics.jsonl
  assert "trainable" in out and "compiled train step" in out and "first step: 1 sample(s) (packed)" in out

  export = to_hf(tmp_path / "run", tmp_path / "hf", "--dtype=float32")
  ours = af3_jax.from_pretrained(tmp_path / "run" / "model", dtype=jnp.float32)
  ref = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(export).eval()
  ids = np.random.default_rng(1).integers(0, 290, (1, 12))
  with torch.no_grad():
    expected = ref(input_ids=torch.tensor(ids)).logits.numpy()
  got = np.asarray(ours(input_ids=ids))
  assert_close(got, expected)


def stop_and_resume(run_setup, tmp_path, save_every: int, stop, while_running=lambda: None):
  """Runs 6 steps straight, and again stopped by `stop(proc)` after 3 logged steps (having called
  `while_running()` then) and then rerun; returns (the stopped process's stdout, its return code,
  straight losses, resumed losses). The resumed run's metrics.jsonl holds each step once. Rows take
  three windows, so each packs three samples."""
  model, manifest, _ = run_setup
  args = ("--config.total_steps=6", f"--config.save_every={save_every}", "--config.data.max_windows=3")
  code, out, err = train(tmp_path / "straight", model, manifest, *args)
  assert code == 0 and "first step: 3 sample(s) (packed)" in out, err[-2000:]
  proc = train(tmp_path / "cut", model, manifest, *args, wait=False)
  wait_for_steps(tmp_path / "cut", 3)
  while_running()
  stop(proc)
  stop_out, _ = proc.communicate(timeout=300)
  code, out, err = train(tmp_path / "cut", model, manifest, *args)
  assert code == 0 and "resumed from step" in out, err[-2000:]
  _, records = losses(tmp_path / "cut")
  assert [r["step"] for r in records] == list(range(1, 7))
  return stop_out, proc.returncode, losses(tmp_path / "straight")[0], losses(tmp_path / "cut")[0]


def test_sigterm_then_resume_matches_an_uninterrupted_run(run_setup, tmp_path):
  out, code, straight, cut = stop_and_resume(run_setup, tmp_path, 2, lambda p: p.send_signal(signal.SIGTERM))
  assert code == 0 and out.splitlines()[-1].startswith("stopped at step "), out[-2000:]
  assert sorted(cut) == sorted(straight) == list(range(1, 7))
  np.testing.assert_allclose([cut[s] for s in range(1, 7)], [straight[s] for s in range(1, 7)], rtol=1e-6)


def test_a_longer_rerun_writes_the_last_steps_model_and_warns_of_changes(run_setup, tmp_path):
  """A finished 3-step run rerun with total_steps=5 (and another lr) trains steps 4 and 5, says which
  settings changed, and leaves the step-5 state in W/model; log_every=2 logs steps 2, 3 then 4, 5."""
  model, manifest, _ = run_setup
  workdir = tmp_path / "run"
  code, _, err = train(workdir, model, manifest, "--config.total_steps=3", "--config.log_every=2")
  assert code == 0, err[-2000:]
  first = af3_jax.from_pretrained(workdir / "model", dtype=jnp.float32)
  code, _, err = train(workdir, model, manifest, "--config.total_steps=5", "--config.log_every=2",
                       "--config.optim.lr=0.001")
  assert code == 0, err[-2000:]
  assert "optim.lr: 0.003 -> 0.001" in err and "total_steps: 3 -> 5" in err
  assert [r["step"] for r in losses(workdir)[1]] == [2, 3, 4, 5]
  assert json.loads((workdir / "model" / "trainer_state.json").read_text()) == {"step": 5}
  saved = saved_params(workdir, 5)
  last = af3_jax.from_pretrained(workdir / "model", dtype=jnp.float32).state
  flat = lambda tree: dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  ours = {jax.tree_util.keystr(k): v for k, v in flat(nnx.to_pure_dict(last)).items()}
  moved = 0
  before = {jax.tree_util.keystr(k): v for k, v in flat(nnx.to_pure_dict(first.state)).items()}
  for key, value in flat(saved).items():
    name = jax.tree_util.keystr(key)
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
    moved += not np.array_equal(value, before[name])
  assert moved  # steps 4 and 5 changed the model


def test_two_processes_match_one(run_setup, tmp_path):
  """train.py as 2 processes (one CPU device each, gloo) gives the per-step losses of 1 process with 2
  devices; only process 0 writes metrics, and both processes write the final model together. Packed
  rows of one window hold one of these samples each (all have audio), so both runs' steps hold the
  same samples: packing more would fill each host's rows from its own share."""
  model, manifest, _ = run_setup
  args = ("--config.total_steps=3", "--config.save_every=100")
  two = start_processes(train_args(tmp_path / "two", model, manifest, *args), ROOT)  # first: it may skip
  one = subprocess.Popen([sys.executable, *train_args(tmp_path / "one", model, manifest, *args)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  procs = [one, *two]
  for p, (_, err) in zip(procs, finish(procs, timeout=240)):
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
  """SIGKILL amid asynchronous checkpoints every 2 steps, after 3 logged steps: the rerun resumes from
  the latest complete one (logging each step once) and ends with the losses of an uninterrupted run.
  While the first run lives, a second one on its workdir is refused at once; its kill frees the
  workdir for the rerun."""
  model, manifest, _ = run_setup

  def second_run():
    code, _, err = train(tmp_path / "cut", model, manifest, "--config.total_steps=6")
    assert code == 1 and err.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'cut'}: another train.py run (pid")
    assert "Traceback" not in err

  _, _, straight, killed = stop_and_resume(run_setup, tmp_path, 2, lambda p: p.kill(), second_run)
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


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_and_resumes(run_setup, tmp_path):
  """2 processes, SIGTERM to process 1 alone after 2 logged steps: both save the same step and exit 0;
  the rerun of both ends with the per-step losses of an uninterrupted 2-process run. About 3 minutes
  on 2 cores: three 2-process runs."""
  model, manifest, _ = run_setup
  # Steps enough that the stop (the preemption notice takes a second or two to reach every process)
  # comes before the end; checkpoints only when stopping.
  args = ("--config.total_steps=12", "--config.save_every=100")
  straight = start_processes(train_args(tmp_path / "straight", model, manifest, *args), ROOT)
  for p, (_, err) in zip(straight, finish(straight, timeout=400)):
    assert p.returncode == 0, err[-2000:]

  cut = start_processes(train_args(tmp_path / "cut", model, manifest, *args), ROOT)
  wait_for_steps(tmp_path / "cut", 2)
  cut[1].send_signal(signal.SIGTERM)
  outs = finish(cut, timeout=300)
  # The line's outcome, not its timings after " | " (each process's own).
  stopped = [[line.split(" | ")[0] for line in out.splitlines() if line.startswith("stopped at step")]
             for out, _ in outs]
  assert [p.returncode for p in cut] == [0, 0], [err[-2000:] for _, err in outs]
  assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped  # the same step in both
  step = int(stopped[0][0].split()[3])
  assert 2 <= step < 12 and max(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir()) == step

  again = start_processes(train_args(tmp_path / "cut", model, manifest, *args), ROOT)
  outs = finish(again, timeout=400)
  assert [p.returncode for p in again] == [0, 0], [err[-2000:] for _, err in outs]
  assert f"resumed from step {step}" in outs[0][0] and f"resumed from step {step}" in outs[1][0]
  by_step, records = losses(tmp_path / "cut")
  assert [r["step"] for r in records] == list(range(1, 13))
  expected = losses(tmp_path / "straight")[0]
  np.testing.assert_allclose([by_step[s] for s in range(1, 13)], [expected[s] for s in range(1, 13)], rtol=1e-6)
