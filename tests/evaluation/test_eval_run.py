"""eval.py's plumbing without a model: benchmark files into prompts, the processes' split and merge, a
run's folder and its reruns, and bad input. A stand-in answers where the model would."""

import json

import pytest

import eval as eval_cli
from af3_jax.evaluation import journal, runner, tasks

MMAU_ITEM = {  # the first item of MMAU's mmau-test-mini.json, as published
    "id": "3fe64f3d-282c-4bc8-a753-68f8f6c35652",
    "audio_id": "./test-mini-audios/3fe64f3d-282c-4bc8-a753-68f8f6c35652.wav",
    "question": "Based on the given audio, identify the source of the speaking voice.",
    "choices": ["Man", "Woman", "Child", "Robot"], "answer": "Man", "dataset": "AudioSet", "task": "sound",
    "split": "test-mini", "category": "Reasoning", "sub-category": "Acoustic Source Inference", "difficulty": "medium"}


def mmau_file(tmp_path, n=5):
  """n items in MMAU's format; items 0 and 1 ask about one clip."""
  items = [{**MMAU_ITEM, "id": f"q{i}", "audio_id": f"./test-mini-audios/clip{max(i - 1, 0)}.wav"} for i in range(n)]
  path = tmp_path / "mmau-test-mini.json"
  path.write_text(json.dumps(items))
  return path, items


def stand_in(prompts):
  """Answers "Man" to every prompt, or fails it when its audio file does not exist, as the model does."""
  for p in prompts:
    audio = p.conversation[0]["content"][0]["path"]
    yield {"id": p.id, "error": f"{audio}: no such file"} if "missing" in audio else {"id": p.id, "output": "Man"}


def test_mmau_prompt_is_nvidias_and_audio_comes_from_the_root(tmp_path):
  path, items = mmau_file(tmp_path, 1)
  bench = tasks.load("mmau", path, audio_root=tmp_path / "..")
  (item,) = bench.items
  assert item.id == "q0" and item.record == items[0]
  assert item.prompt.conversation == [{"role": "user", "content": [
      {"type": "audio", "path": str(tmp_path / ".." / "test-mini-audios/clip0.wav")},
      {"type": "text", "text": "Based on the given audio, identify the source of the speaking voice. Choose the "
                               "correct option from the following options:\n(A) Man\n(B) Woman\n(C) Child\n(D) Robot"}]}]


def test_eval_py_names_every_task_before_jax_loads():
  assert eval_cli.TASKS == list(tasks.TASKS)


def test_templates_fill_question_options_and_choices(tmp_path):
  path, _ = mmau_file(tmp_path, 1)
  bench = tasks.load("mmau", path, template="{question}\nSelect one option from the provided choices:\n{choices}")
  assert bench.items[0].prompt.conversation[0]["content"][1]["text"].endswith("choices:\nMan\nWoman\nChild\nRobot")


def test_mmar_jsonl_asr_and_aqa_files(tmp_path):
  mmar = tmp_path / "MMAR-meta.jsonl"
  mmar.write_text(json.dumps({"id": "x", "audio_path": "./audio/x.wav", "question": "Which?",
                              "choices": ["Owl", "Parrot"], "answer": "Parrot", "modality": "sound"}) + "\n\n")
  (item,) = tasks.load("mmar", mmar).items
  assert item.prompt.conversation[0]["content"][1]["text"] == ("Which? Choose the correct option from the following "
                                                              "options:\n(A) Owl\n(B) Parrot")
  asr = tmp_path / "asr.json"
  asr.write_text(json.dumps([{"audio": "a.flac", "text": "HELLO"}, {"audio": "b.flac", "text": "WORLD"}]))
  bench = tasks.load("asr", asr, limit=1)
  assert [i.id for i in bench.items] == ["0"]  # no ids: numbered
  assert bench.items[0].prompt.conversation[0]["content"][1]["text"] == "Transcribe the input speech."
  aqa = tmp_path / "aqa.json"
  aqa.write_text(json.dumps([{"id": 3, "audio": "a.wav", "question": "Is it raining?", "answer": "yes"}]))
  assert tasks.load("aqa", aqa).items[0].prompt.conversation[0]["content"][1]["text"] == "Is it raining?"


def test_manifest_keeps_the_reference_beside_the_answer(tmp_path):
  path = tmp_path / "test.json"
  path.write_text(json.dumps([{"id": "a", "sound": "a.wav", "conversations": [
      {"from": "human", "value": "<sound>\nWhat is it?"}, {"from": "gpt", "value": "A dog."}]}]))
  (tmp_path / "clips").mkdir()
  bench = tasks.load("manifest", path, audio_root=tmp_path / "clips")
  assert bench.items[0].audio == (str(tmp_path / "clips" / "a.wav"),)
  (record,) = bench.predictions({"a": {"id": "a", "output": "A dog."}})
  assert record["reference"] == "A dog." and record["model_output"] == "A dog."
  assert tasks.TASKS["manifest"].score([record]) == {"exact_match": 100.0, "n": 1, "correct": 1, "no_reference": 0}


@pytest.mark.parametrize("task, content, template, message", [
    ("mmau", "[{\"id\": 1", None, "{path}: not valid JSON (Expecting ',' delimiter: line 1 column 10 (char 9))"),
    ("mmau", "{}", None, "{path}: expected a JSON list of items, got dict"),
    ("mmau", json.dumps([{"id": "a", "question": "?"}]), None,
     "{path}: item 0 (id 'a'): missing field(s) audio_id, choices, answer"),
    ("mmau", json.dumps([MMAU_ITEM, MMAU_ITEM]), None,
     "{path}: ids must be unique as strings (1 and \"1\" are one id, null is 'None'); repeated: "
     "'3fe64f3d-282c-4bc8-a753-68f8f6c35652' (items 0, 1)"),
    ("mmau", json.dumps([MMAU_ITEM]), "{question} {answer}",
     "--prompt-template: unknown field(s) answer for task mmau (fields: {{choices}}, {{options}}, {{question}})"),
    ("asr", json.dumps([{"audio": "a.wav", "text": "x"}]), "{question}",
     "--prompt-template: unknown field(s) question for task asr (fields: none)"),
    ("manifest", json.dumps([]), "{question}",
     "--prompt-template does not apply to task manifest: its prompts are the manifest's turns"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, task, content, template, message):
  path = tmp_path / "data.json"
  path.write_text(content)
  with pytest.raises(ValueError) as e:
    tasks.load(task, path, template=template)
  assert str(e.value) == message.format(path=path)


def test_two_processes_split_the_items_and_process_0_merges(tmp_path):
  path, items = mmau_file(tmp_path, 5)
  items[3]["audio_id"] = "./missing.wav"
  path.write_text(json.dumps(items))
  bench = tasks.load("mmau", path)
  out = tmp_path / "out"
  runs = [runner.Run(out, bench, {"task": "mmau"}, process=p) for p in (0, 1)]
  todo = [run.todo(p, 2) for p, run in enumerate(runs)]
  assert [[i.id for i in t] for t in todo] == [["q0", "q2", "q4"], ["q1", "q3"]]
  sessions = [run.answer(t, stand_in, p) for p, (run, t) in enumerate(zip(runs, todo))]
  assert [s.items for s in sessions] == [3, 1]
  with open(journal.path(out, 1), "a") as f:
    f.write('{"id": "q')  # process 1 still writing: its half line is not an error for process 0
  sessions[0].wall_s, sessions[1].wall_s = 2.0, 4.0
  summary = runs[0].write(sessions)
  predictions = json.loads((out / "predictions.json").read_text())
  assert [p["id"] for p in predictions] == [f"q{i}" for i in range(5)]  # the file's order
  assert [p.get("model_output") for p in predictions] == ["Man", "Man", "Man", None, "Man"]
  assert predictions[3]["error"] == f"{tmp_path / 'missing.wav'}: no such file"
  assert {k: v for k, v in predictions[0].items() if k != "model_output"} == items[0]
  assert summary["accuracy"] == 100.0 and summary["n"] == 4 and summary["errors"] == 1
  assert summary["throughput"]["items"] == 4 and summary["throughput"]["wall_s"] == 4.0  # side by side
  assert summary["throughput"]["items_per_s"] == 1.0 and summary["throughput"]["processes"] == 2
  assert runs[0].finished()


def test_a_rerun_answers_only_what_no_journal_holds_and_refuses_other_settings(tmp_path):
  path, _ = mmau_file(tmp_path, 4)
  bench = tasks.load("mmau", path)
  out = tmp_path / "out"
  run = runner.Run(out, bench, {"task": "mmau", "model": "m", "limit": 2, "batch_size": 8})
  run.answer(run.todo(0, 1)[:2], stand_in)
  # A later run with one process more: process 1 of 2 skips q0 (answered by the old process 0).
  rerun = runner.Run(out, bench, {"task": "mmau", "model": "m", "limit": None, "batch_size": 1}, process=1)
  assert [i.id for i in rerun.todo(1, 2)] == ["q3"]
  assert not rerun.finished()
  with pytest.raises(ValueError, match=r"holds answers made with other settings \(model: 'm' there, 'n' here\)"):
    runner.Run(out, bench, {"task": "mmau", "model": "n"})


def test_rescore_recomputes_from_an_edited_or_foreign_file(tmp_path):
  path, items = mmau_file(tmp_path, 4)
  out = tmp_path / "out"
  run = runner.Run(out, tasks.load("mmau", path), {"task": "mmau"})
  run.answer(run.todo(0, 1), stand_in)
  first = run.write([runner.Throughput(4, 40.0, 2.0)])
  predictions = json.loads((out / "predictions.json").read_text())
  predictions[1]["model_output"] = "Woman"
  (out / "predictions.json").write_text(json.dumps(predictions))
  summary = runner.rescore(out)
  assert (first["accuracy"], summary["accuracy"]) == (100.0, 75.0)
  assert summary["throughput"] == first["throughput"] and summary["settings"] == first["settings"]
  assert json.loads((out / "summary.json").read_text()) == summary
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "predictions.json").write_text(json.dumps(predictions))
  assert runner.rescore(foreign)["task"] == "mmau"  # guessed from the keys
  with pytest.raises(ValueError, match=r"no predictions.json to rescore"):
    runner.rescore(tmp_path)
