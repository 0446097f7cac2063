"""The benchmarks' scoring rules, without a model.

Multiple choice: the expectations follow `string_match` in MMAU's evaluation.py (Sakshi113/MMAU,
commit 7468292) and MMAR's code/evaluation.py (the same function): lowercase, take the set of
`\\b\\w+\\b` words; right when every word of the answer is in the prediction and no word of another
choice, less the words it shares with the answer, is; an empty prediction is wrong. With
MMAU_EVALUATION_PY pointing at a copy of MMAU's evaluation.py, its own output is compared with ours.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from af3_jax.evaluation import scoring, tasks
from af3_jax.evaluation.runner import summarize

FOUR = ["Man", "Woman", "Child", "Robot"]
# MMAU test-mini's only 8-choice item (id 7a1dcecc-...): one choice swallowed a stray question.
EIGHT = ["Lake", "AirBased on the given audio, what is the most likely setting?", "A cooking competition",
         "A motorsport racing event", "A live concert", "A political rallyport", "Forest", "Desert"]
FIVE = ["A dog barking", "A cat", "A dog howling", "Birds", "Rain"]


@pytest.mark.parametrize("prediction, right", [
    ("A", False),  # a bare letter: its word "a" is not the answer's; the scorer never maps letters
    ("(A)", False),
    ("(A) Man", True),  # the letter's word belongs to no choice
    ("Man", True),
    ("MAN!", True),
    ("The speaker is a man.", True),  # inside a sentence
    ("It sounds like a woman speaking.", False),
    ("Man or Woman", False),  # names two choices
    ("The voice belongs to a man, not a woman.", False),
    ("", False),  # empty
    ("   ", False),
    ("...", False),  # no word at all
    ("Manly", False),  # words, not substrings
])
def test_four_choices(prediction, right):
  assert scoring.string_match("Man", prediction, FOUR) is right


@pytest.mark.parametrize("choices, answer, prediction, right", [
    (["wind", "wharf"], "wind", "Wind.", True),  # MMAU's 2-choice items
    (["wind", "wharf"], "wind", "wharf", False),
    # Shared words do not count against the answer: "ups" is in both, only "pull" is wrong.
    (["push-ups", "pull-ups"], "push-ups", "push-ups", True),
    (["push-ups", "pull-ups"], "push-ups", "ups", False),
    (["push-ups", "pull-ups"], "push-ups", "pull-ups", False),
    # Five choices: every word of the answer is needed, "a" included.
    (FIVE, "A dog barking", "A dog is barking loudly.", True),
    (FIVE, "A dog barking", "dog barking", False),
    (FIVE, "A dog barking", "A dog barking, not howling", False),
    # Eight choices: the malformed one makes "the", "is", "audio" ... wrong words.
    (EIGHT, "A motorsport racing event", "A motorsport racing event", True),
    (EIGHT, "A motorsport racing event", "(D) A motorsport racing event.", True),
    (EIGHT, "A motorsport racing event", "The answer is a motorsport racing event.", False),
    # A choice with the answer's very words is not another choice.
    (["Man", "man", "Woman"], "Man", "man", True),
])
def test_two_five_and_eight_choices(choices, answer, prediction, right):
  assert scoring.string_match(answer, prediction, choices) is right


def test_named_choices_is_a_diagnostic():
  assert scoring.named_choices("(A)", FOUR) == []
  assert scoring.named_choices("a man or a woman", FOUR) == [0, 1]
  assert scoring.named_choices("push-ups", ["push-ups", "pull-ups"]) == [0]


def mmau_item(i, answer_index, output=None, **fields):
  item = {"id": f"q{i}", "audio_id": f"./a/{i}.wav", "question": "Who speaks?", "choices": FOUR,
          "answer": FOUR[answer_index], "task": "speech", "category": "Reasoning", "sub-category": "Speaker",
          "difficulty": "easy", **fields}
  if output is not None:
    item["model_output"] = output
  return item


def test_mmau_summary_skips_items_without_an_answer_and_breaks_down():
  records = [mmau_item(0, 0, "Man"), mmau_item(1, 1, "B", task="sound", category=["Reasoning"]),
             mmau_item(2, 2, "Child", difficulty="hard"), mmau_item(3, 3, "Man or Robot"),
             {**mmau_item(4, 0), "error": "x.wav: no such file"}]
  summary = summarize(tasks.TASKS["mmau"], records)
  assert summary["accuracy"] == pytest.approx(50.0) and summary["n"] == 4 and summary["correct"] == 2
  assert summary["accuracy_over_all_items"] == pytest.approx(40.0)
  assert summary["no_choice_named"] == 1 and summary["several_choices_named"] == 1
  assert (summary["items"], summary["answered"], summary["errors"], summary["unanswered"]) == (5, 4, 1, 0)
  assert summary["error_examples"] == [{"id": "q4", "error": "x.wav: no such file"}]
  assert summary["by_task"] == {"sound": {"accuracy": 0.0, "n": 1}, "speech": {"accuracy": pytest.approx(200 / 3),
                                                                               "n": 3}}
  assert summary["by_category"] == {"Reasoning": {"accuracy": 50.0, "n": 4}}  # ["Reasoning"] joins "Reasoning"
  assert summary["by_difficulty"]["hard"] == {"accuracy": 100.0, "n": 1}


def test_mmar_reads_its_own_key_and_breakdowns():
  record = {"id": "m", "audio_path": "./audio/m.wav", "question": "?", "choices": ["Owl", "Parrot"],
            "answer": "Parrot", "modality": "sound", "category": "Signal Layer", "sub-category": "x",
            "answer_prediction": "Parrot"}
  other_key = {k: v for k, v in record.items() if k != "answer_prediction"} | {"model_output": "Owl"}
  summary = summarize(tasks.TASKS["mmar"], [record, other_key])
  assert summary["accuracy"] == 100.0 and summary["n"] == 1
  assert summary["by_modality"] == {"sound": {"accuracy": 100.0, "n": 1}}


@pytest.mark.skipif(not os.environ.get("MMAU_EVALUATION_PY"), reason="set MMAU_EVALUATION_PY to MMAU's evaluation.py")
def test_mmau_official_scorer_agrees(tmp_path):
  outputs = ["A", "(A) Man", "The speaker is a man.", "Man or Woman", "", "Child", "a child", "Robot voice"]
  records = [mmau_item(i, i % 4, out, task=("sound", "music", "speech")[i % 3]) for i, out in enumerate(outputs)]
  path = tmp_path / "predictions.json"
  path.write_text(json.dumps(records))
  run = subprocess.run([sys.executable, os.environ["MMAU_EVALUATION_PY"], "--input", str(path)],
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  total = re.search(r"Total Accuracy: ([\d.]+)% over (\d+) samples", run.stdout)
  ours = summarize(tasks.TASKS["mmau"], records)
  assert (total[1], int(total[2])) == (f"{ours['accuracy']:.2f}", ours["n"])
  for task, got in ours["by_task"].items():
    assert f"{task} : {got['accuracy']:.2f}% over {got['n']} samples" in run.stdout


@pytest.mark.parametrize("text, normalized", [
    ("Twenty-five apples.", "25 apples"),
    ("The colour of the theatre", "the color of the theater"),  # British spellings
    ("Mr. Smith, uh, left", "mister smith left"),  # fillers out
])
def test_whisper_normalizer(text, normalized):
  assert scoring.normalize(text) == normalized


def test_wer_is_corpus_micro_averaged_with_per_sample_statistics():
  pairs = [("twenty-five apples", "25 apples"),  # 0 after normalisation
           ("the colour is red", 'The spoken content of the audio is "the color is blue".'),  # framing stripped: 1/4
           ("a b c d", "a x c"),  # a substitution and a deletion: 2/4
           ("", "hmm extra words")]  # empty reference: its 2 words are insertions in the corpus WER only
  summary = scoring.wer_summary(pairs)
  assert (summary["substitutions"], summary["deletions"], summary["insertions"]) == (2, 1, 2)
  assert summary["reference_words"] == 10 and summary["wer"] == pytest.approx(50.0)
  assert summary["empty_references"] == 1 and summary["n"] == 4
  per = summary["per_sample_wer"]
  assert per["mean"] == pytest.approx(25.0) and per["median"] == pytest.approx(25.0)
  assert per["p95"] == pytest.approx(47.5)  # numpy's linear interpolation over 0, 25, 50


def test_wer_of_only_empty_references():
  summary = scoring.wer_summary([("", "words")])
  assert summary["wer"] is None and summary["per_sample_wer"] is None and summary["empty_references"] == 1


@pytest.mark.parametrize("answer, framed", [
    ('The spoken content of the audio is "Hello there."', "Hello there."),
    ("The transcription of the audio is 'yes'.", "yes"),
    ("Just words.", "Just words"),
])
def test_transcript_drops_af3s_framing(answer, framed):
  assert scoring.transcript(answer) == framed


def test_aqa_normalizes_and_manifest_matches_exactly():
  assert scoring.match_summary([("yes", "Yes."), ("two", "2"), ("no", "yes")], normalized=True) == \
      {"accuracy": pytest.approx(200 / 3), "n": 3, "correct": 2}
  assert scoring.match_summary([("a dog", " a dog\n"), ("a dog", "A dog")], normalized=False) == \
      {"exact_match": 50.0, "n": 2, "correct": 1}
