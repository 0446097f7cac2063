"""eval.py end to end on a tiny checkpoint and a synthetic MMAU set in the published format (audio made
here): scores and files, a rerun that writes nothing, a killed run resumed, a missing clip counted,
--rescore, the other tasks, and bad input as one line."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT
from helpers.processes import finish, start_processes
from programs import FAST, run_eval

import eval as eval_cli
from af3_jax.evaluation import runner, tasks




def mmau_args(model_dir, data, out, *extra):
  return ["--task", "mmau", "--data", str(data), "--model", str(model_dir), "--out", str(out), *FAST, *extra]


def snapshot(folder):
  return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def straight(model_dir, mmau, tmp_path_factory):
  """An uninterrupted run, one item per generate call: (folder, its files' snapshot)."""
  out = tmp_path_factory.mktemp("straight") / "run"
  eval_cli.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exited:
    eval_cli.main(["eval.py", *mmau_args(model_dir, mmau[0], out, "--batch-size", "1")])
  assert exited.value.code == 1  # q4's clip is missing
  return out, snapshot(out)


def test_mmau_files_scores_and_a_rerun_that_writes_nothing(model_dir, mmau, tmp_path, capsys):
  """A missing clip fails its item alone; the exit status says an item failed, as infer.py --batch's does
  (also on a rerun that finds it so). --out's missing parents are made."""
  data, items = mmau
  out = tmp_path / "runs" / "run"
  code, stdout, err = run_eval(mmau_args(model_dir, data, out, "--batch-size", "4"), capsys)
  failed = (f"1 item(s) failed (their messages are under 'error' in {out / 'predictions.json'}); fix them (a missing "
            "audio file, say) and rerun with --retry-errors")
  assert code == 1 and err.splitlines()[-1] == failed, err
  predictions = json.loads((out / "predictions.json").read_text())
  summary = json.loads((out / "summary.json").read_text())
  assert [{k: v for k, v in p.items() if k not in ("model_output", "error")} for p in predictions] == items
  assert all(isinstance(p["model_output"], str) for i, p in enumerate(predictions) if i != 4)
  missing = data.parent / "test-mini-audios" / "clipmissing.wav"
  assert "model_output" not in predictions[4] and predictions[4]["error"] == f"{missing}: no such file"
  assert summary == {**runner.summarize(tasks.TASKS["mmau"], predictions), "throughput": summary["throughput"],
                     "settings": summary["settings"], "versions": summary["versions"]}
  assert (summary["n"], summary["errors"], summary["items"]) == (6, 1, 7)
  assert summary["error_examples"] == [{"id": "q4", "error": f"{missing}: no such file"}]
  speed = summary["throughput"]
  assert speed["items"] == 6 and speed["audio_s"] == pytest.approx(1 + 1 + 1.5 + 2.5 + 2 + 2)  # shared clips twice
  assert speed["rtfx"] == pytest.approx(speed["audio_s"] / speed["wall_s"])
  assert summary["settings"]["decoding"] == {"greedy": True, "repetition_penalty": 1.0, "max_new_tokens": 3}
  assert summary["settings"]["prompt_template"] == tasks.CHOICE_TEMPLATE and summary["settings"]["style"] == "nvidia"
  assert {"jax", "python", "jiwer", "whisper-normalizer"} <= summary["versions"].keys()
  assert stdout.startswith(f"mmau: accuracy {summary['accuracy']:.2f}% over 6 scored of 7 items (1 errors)")
  before = snapshot(out)
  code, _, err = run_eval(mmau_args(model_dir, data, out, "--batch-size", "2"), capsys)
  assert code == 1 and "nothing to do" in err and err.splitlines()[-1] == failed
  assert snapshot(out) == before


def test_a_killed_run_resumes_to_the_predictions_of_an_uninterrupted_one(model_dir, mmau, straight, tmp_path, capsys):
  out = tmp_path / "run"
  args = mmau_args(model_dir, mmau[0], out, "--batch-size", "1")
  proc = subprocess.Popen([sys.executable, "eval.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  journal = out / "answers.0.jsonl"
  deadline = time.monotonic() + 240
  while proc.poll() is None and time.monotonic() < deadline and not (journal.exists() and journal.read_text()):
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  before = journal.read_text().splitlines()
  assert 1 <= len(before) < 7 and not (out / "predictions.json").exists()
  code, _, err = run_eval(args, capsys)
  assert code == 1 and "1 item(s) failed" in err, err
  assert (out / "predictions.json").read_bytes() == straight[1]["predictions.json"][0]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["throughput"]["items"] == 6 - sum('"output"' in line for line in before)  # this session's


@pytest.mark.slow  # about 25 s; test_eval_run.py checks the split and the merge in one process
def test_two_processes_split_the_items_and_write_the_files_of_one(model_dir, mmau, straight, tmp_path):
  """eval.py as 2 processes (one CPU device each, gloo): the predictions of one process."""
  out = tmp_path / "run"
  procs = start_processes(["eval.py", *mmau_args(model_dir, mmau[0], out, "--batch-size", "1")], ROOT)
  results = finish(procs, timeout=300)
  assert [p.returncode for p in procs] == [1, 0], [err[-2000:] for _, err in results]  # process 0 reports q4
  assert "mmau: accuracy" in results[0][0] and "mmau:" not in results[1][0]  # process 0 alone reports
  assert (out / "predictions.json").read_bytes() == straight[1]["predictions.json"][0]
  assert sorted(p.name for p in out.glob("answers.*.jsonl")) == ["answers.0.jsonl", "answers.1.jsonl"]
  speed = json.loads((out / "summary.json").read_text())["throughput"]
  assert speed["processes"] == 2 and speed["items"] == 6


def test_rescore_recomputes_an_edited_file_and_keeps_the_run(straight, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(straight[0], out)
  predictions = json.loads((out / "predictions.json").read_text())
  before = json.loads((out / "summary.json").read_text())
  predictions[0]["model_output"] = f"It is ({predictions[0]['answer']})."
  predictions[1]["model_output"] = ""
  (out / "predictions.json").write_text(json.dumps(predictions))
  code, stdout, _ = run_eval(["--rescore", str(out)], capsys)
  summary = json.loads((out / "summary.json").read_text())
  assert code == 0 and summary == {**runner.summarize(tasks.TASKS["mmau"], predictions),
                                   **{k: before[k] for k in ("throughput", "settings", "versions")}}
  assert summary["correct"] >= 1 and stdout.startswith(f"mmau: accuracy {summary['accuracy']:.2f}%")


def test_asr_aqa_and_manifest_runs(model_dir, mmau, tmp_path, capsys):
  clips = mmau[0].parent / "test-mini-audios"
  files = {"asr": [{"audio": "clip0.wav", "text": "Twenty-five apples."}, {"audio": "clip1.wav", "text": ""}],
           "aqa": [{"id": "a", "audio": "clip2.wav", "question": "Is it raining?", "answer": "yes"}],
           "manifest": [{"id": "m", "sound": "clip3.wav", "conversations": [
               {"from": "human", "value": "<sound>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]},
                        {"id": "free", "conversations": [{"from": "human", "value": "Say hi."}]}]}
  scores = {"asr": "wer", "aqa": "accuracy", "manifest": "exact_match"}
  templates = {"aqa": ["--prompt-template", r"Q: {question}\nA:"]}  # as typed in a shell: backslash, n
  for task, records in files.items():
    data = tmp_path / f"{task}.json"
    data.write_text(json.dumps(records))
    out = tmp_path / task
    code, stdout, err = run_eval(["--task", task, "--data", str(data), "--audio-root", str(clips), "--model",
                                  str(model_dir), "--out", str(out), *FAST, *templates.get(task, [])], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task and scores[task] in summary and summary["answered"] == len(records)
  aqa = json.loads((tmp_path / "aqa" / "summary.json").read_text())
  assert aqa["settings"]["prompt_template"] == "Q: {question}\nA:"
  assert summary["n"] == 1 and json.loads((tmp_path / "manifest" / "predictions.json").read_text())[0]["reference"] == \
      "Noise."
  # The item without a reference turn is answered, not scored, and said so.
  assert summary["no_reference"] == 1 and "over 1 scored of 2 items (0 errors; 1 answered without a reference)" in stdout


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/mmau.json", "--out", "{tmp}/o"], "give --task (or --rescore OUT)"),
    (["--task", "mmau", "--data", "{tmp}/nope.json", "--out", "{tmp}/o"], "{tmp}/nope.json: no such data file"),
    (["--task", "mmau", "--data", "{tmp}", "--out", "{tmp}/o"], "{tmp}: is a folder; --data takes a file"),
    (["--task", "mmlu"], "flag --task=mmlu: value should be one of <mmau|mmar|asr|aqa|manifest>"),
    (["--task", "mmau", "--data", "{tmp}/bad.json", "--out", "{tmp}/o"],
     "{tmp}/bad.json: not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (["--rescore", "{tmp}"], "{tmp}: no predictions.json to rescore"),
    (["--rescore", "{tmp}", "--limit", "3"], "--rescore takes only --task besides; drop --limit"),
])
def test_bad_input_is_one_line_and_exit_1(args, message, tmp_path, capsys):
  (tmp_path / "bad.json").write_text("not json")
  fill = {"tmp": tmp_path}
  code, _, err = run_eval([a.format(**fill) for a in args], capsys)
  assert (code, err.splitlines()) == (1, [f"error: {message.format(**fill)}"])


def test_a_run_with_other_settings_is_refused_without_a_traceback(straight, mmau, model_dir):
  args = ["eval.py", *mmau_args(model_dir, mmau[0], straight[0]), "--think"]
  run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 1 and "Traceback" not in run.stderr
  assert run.stderr.splitlines() == [f"error: {straight[0]}: holds answers made with other settings "
                                     "(think: False there, True here); use another --out, or the same settings "
                                     "to resume"]
