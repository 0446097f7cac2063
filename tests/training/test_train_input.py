"""train.py on bad input: a corrupt audio file is skipped, named once and counted in the summary; flags,
configs, manifests and init_from checkpoints refused in one line (exit 1) before the model loads; a
manifest with nothing usable refused without writing a model."""

import json
import re
import shutil

import pytest
from programs import losses, train


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
