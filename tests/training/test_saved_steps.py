"""Which model of a training workdir a name means, from its folders alone: `workdirs.saved_model` (an
export's --step, an init_from naming a workdir) and `start_checkpoint` (a resumed run keeps the
checkpoint it started from while the workdir it names saves later steps)."""

import json
import re

import pytest

from af3_jax.training import workdirs
from configs import tiny


def workdir(root, steps, finished=None):
  """A workdir with checkpoint folders for `steps` (and an unfinished save), and model/ at `finished`."""
  for step in steps:
    (root / "checkpoints" / str(step)).mkdir(parents=True)
  (root / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save under way
  if finished is not None:
    (root / "model").mkdir()
    (root / "model" / workdirs.TRAINER_STATE).write_text(json.dumps({"step": finished}))
  return root


def test_saved_model_is_the_finished_model_at_its_step_and_a_checkpoint_before(tmp_path):
  w = workdir(tmp_path / "w", [2, 4], finished=4)
  assert workdirs.saved_model(w) == w / "model"
  assert workdirs.saved_model(w, 4) == w / "model"
  assert workdirs.saved_model(w, 2) == w / "checkpoints" / "2"
  with pytest.raises(ValueError, match=re.escape(f"{w}: no saved step 9; saved steps: 2, 4")):
    workdirs.saved_model(w, 9)
  unfinished = workdir(tmp_path / "u", [2, 4])
  assert workdirs.saved_model(unfinished) == unfinished / "checkpoints" / "4"
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'e'}: no step saved yet")):
    workdirs.resolve_init(str(workdir(tmp_path / "e", [])))


def test_a_resumed_run_keeps_the_step_it_started_from(tmp_path):
  source = workdir(tmp_path / "source", [2])
  run = tmp_path / "run"
  run.mkdir()
  first = workdirs.start_checkpoint(run, str(source))
  assert first == str((source / "checkpoints" / "2").absolute())
  cfg = tiny.get_config()
  cfg.init_from = str(source)
  workdirs.record_settings(run, cfg, first)
  (source / "checkpoints" / "3").mkdir()  # the source run goes on meanwhile
  assert workdirs.resolve_init(str(source)) == str(source / "checkpoints" / "3")
  assert workdirs.start_checkpoint(run, str(source)) == first
  assert workdirs.start_checkpoint(run, str(source / "checkpoints" / "3")) == str(source / "checkpoints" / "3")
