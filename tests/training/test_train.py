"""train.py end to end on a tiny checkpoint (CPU, float32): the loss falls on a small manifest, a run
stopped by SIGTERM (one process, or one of two) resumes to the same per-step losses, a corrupt file is
skipped, and the export of the finished model or of any saved step loads in transformers (or peft)
with our logits."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT
from helpers.events import read_scalars
from helpers.parity import assert_close
from helpers.processes import finish, start_processes
from programs import ENV, to_hf, train

import af3_jax
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")



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
  assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped", "packing_efficiency"} <= set(records[0])
  assert all(0 < r["packing_efficiency"] <= 1 for r in records)

  (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
  logged = {s: v for s, tag, v in read_scalars(events) if tag == "loss"}
  assert logged == pytest.approx(by_step, rel=1e-6)  # the same losses as metrics.jsonl
  assert "trainable" in out and "compiled train step" in out and "first step: 1 sample(s) (packed)" in out

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
  metrics = tmp_path / "cut" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.05)
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


def test_a_corrupt_file_is_skipped_and_counted(run_setup, tmp_path):
  model, _, corrupt = run_setup
  code, out, err = train(tmp_path / "run", model, corrupt, "--config.total_steps=6")
  assert code == 0, err[-2000:]
  _, records = losses(tmp_path / "run")
  skipped = sum(r["skipped"] for r in records)
  assert skipped >= 1
  # Each pass over the data meets the file again; it is named once. The last line sums the run up.
  (named,) = [line for line in err.splitlines() if "broken.wav" in line]
  assert named.startswith(f"warning: skipping sample bad (each time it comes up): {model.parent / 'broken.wav'}: "
                          "not a readable audio file")
  summary = re.fullmatch(r"done: step 6 of 6; the trained model is in (.+) \| this run: 6 step\(s\) in [\d.]+ s "
                         r"\(compiles included\), ([\d,]+) real tokens/s, (\d+) unusable sample\(s\) skipped",
                         out.splitlines()[-1])
  assert summary and summary[1] == str(tmp_path / "run" / "model") and int(summary[3]) == skipped, out[-500:]
  assert not [line for line in err.splitlines() if line.startswith(("I1", "info:", "W1"))], err[-2000:]


@pytest.mark.parametrize("case, expected", [
    ("missing manifest", "missing.json: not a readable JSON manifest"),
    ("empty manifest", "empty.json: the manifest holds no samples"),
    ("workdir is a file", "--workdir is a file, not a folder"),
    ("typo in an override", 'error: --config overrides: no such field \'lrr\'; did you mean "lr" instead of "lrr"?'),
    ("negative total_steps", "total_steps must be >= 0"),
    ("missing config file", "error: cannot load the --config file ([Errno 2] No such file or directory: "
                            "'configs/nope.py')"),
    ("a config file that is not Python", "error: cannot load the --config file (SyntaxError: '(' was never closed"),
    ("no such stage", "error: flag --config=configs/tiny.py:9: Error whilst parsing config file: ValueError: "
                      "stage 9: the stages are 1, 2, 3, 4, 5"),
    ("no checkpoint in init_from", "no-model: not an AF3 checkpoint"),
    ("init_from a workdir with no step saved", "no-model: no step saved yet"),
])
def test_bad_input_is_one_line_before_the_model_loads(run_setup, tmp_path, case, expected):
  """Each fails in one line with exit 1, and before the model loads: init_from is a folder with a
  config.json and no weights, which would fail later and differently."""
  model, manifest, _ = run_setup
  (tmp_path / "empty.json").write_text("[]")
  (tmp_path / "file").write_text("")
  (tmp_path / "no-model").mkdir()
  shutil.copy(model / "config.json", tmp_path / "no-model")
  workdir, extra, config = tmp_path / "run", [], "configs/tiny.py"
  if case == "missing manifest":
    manifest = tmp_path / "missing.json"
  elif case == "empty manifest":
    manifest, extra = tmp_path / "empty.json", ["--config.total_steps=5"]
  elif case == "workdir is a file":
    workdir = tmp_path / "file"
  elif case == "typo in an override":
    extra = ["--config.optim.lrr=1"]
  elif case == "negative total_steps":
    extra = ["--config.total_steps=-1"]
  elif case == "missing config file":
    config = "configs/nope.py"
  elif case == "a config file that is not Python":
    config = tmp_path / "bad.py"
    config.write_text("x = (\n")
  elif case == "no such stage":
    config = "configs/tiny.py:9"
  elif case == "init_from a workdir with no step saved":
    (tmp_path / "no-model" / "checkpoints").mkdir()
  else:
    (tmp_path / "no-model" / "config.json").unlink()
  code, _, err = train(workdir, tmp_path / "no-model", manifest, *extra, config=config)
  assert code == 1 and expected in err, err[-2000:]
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[-2000:]


def test_a_manifest_with_nothing_usable_exits_1_naming_it(run_setup, tmp_path):
  model, _, _ = run_setup
  bad = json.loads(run_setup[2].read_text())[-1]  # the item whose audio is not a readable WAV
  manifest = tmp_path / "bad.json"
  manifest.write_text(json.dumps([bad, {**bad, "id": "bad2"}]))
  code, _, err = train(tmp_path / "run", model, manifest, "--config.total_steps=4")
  expected = f"error: {manifest}: none of its 2 sample(s) can be used (see the warnings above); nothing to train on"
  assert code == 1 and expected in err.splitlines(), err[-2000:]  # beside the warnings naming each sample
  assert "Traceback" not in err and not (tmp_path / "run" / "model").exists()


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
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore((workdir / "checkpoints" / "5" / "state").absolute())["params"]
  last = af3_jax.from_pretrained(workdir / "model", dtype=jnp.float32).state
  flat = lambda tree: dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  ours = {jax.tree_util.keystr(k): v for k, v in flat(nnx.to_pure_dict(last)).items()}
  moved = 0
  before = {jax.tree_util.keystr(k): v for k, v in flat(nnx.to_pure_dict(first.state)).items()}
  for key, value in flat(saved).items():
    name = jax.tree_util.keystr(key).removesuffix("['value']")  # orbax keeps nnx.State's leaf level
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
    moved += not np.array_equal(value, before[name])
  assert moved  # steps 4 and 5 changed the model


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


def saved_params(workdir, step) -> dict:
  """The trainable params a run's checkpoint holds at `step`, read with orbax alone, as a pure dict."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore((workdir / "checkpoints" / str(step) / "state").absolute())["params"]
  unwrap = lambda tree: tree["value"] if set(tree) == {"value"} else {k: unwrap(v) for k, v in tree.items()}
  return unwrap(saved)  # orbax keeps nnx.State's leaf level


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


def train_args(workdir, model, manifest, *extra) -> list[str]:
  return ["train.py", "--config=configs/tiny.py", f"--workdir={workdir}", f"--config.init_from={model}",
          f"--config.data.train={manifest}", *extra]


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
  metrics = tmp_path / "cut" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
    time.sleep(0.05)
  cut[1].send_signal(signal.SIGTERM)
  outs = finish(cut, timeout=300)
  stopped = [[line for line in out.splitlines() if line.startswith("stopped at step")] for out, _ in outs]
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
