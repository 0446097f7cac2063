"""infer.py on bad input and interruptions, without a model: flags and files refused before the model
loads, the batch results file kept at one valid line per id, chat commands, and Ctrl-C. A stand-in
assistant replaces the model where one would answer (test_infer.py runs the real tiny one)."""

import io
import json
import subprocess
import sys

import pytest
from helpers import ROOT
from programs import run_cli

import cli
import infer
from af3_jax.inference import assistant

NO_MODEL = ["--model", "/nonexistent/af3"]  # an error about the model would mean it was loaded first


class StandIn:
  """Answers like an Assistant without a model: "ok: <question>"; a question holding "bad" fails as a bad
  audio file does, and asking the `interrupt_at`-th question (0-based) raises KeyboardInterrupt."""

  def __init__(self, interrupt_at=None):
    self.stats = assistant.Stats()
    self.asked = []
    self.conversations = []  # as `reply` got them
    self.interrupt_at = interrupt_at

  def encode(self, conversation):
    question = conversation[-1]["content"][-1]["text"]
    if "bad" in question:
      raise ValueError(f"{question}: not a readable audio file")
    return question

  def answers(self, conversations, slots):
    for conversation in conversations:
      try:
        question = self.encode(conversation)
      except ValueError as e:
        yield e
        continue
      if len(self.asked) == self.interrupt_at:
        raise KeyboardInterrupt
      self.asked.append(question)
      self.stats.requests += 1
      yield f"ok: {question}"

  def reply(self, conversation, out, new_audio_s=None):
    self.conversations.append(conversation)
    (answer,) = self.answers([conversation], 1)
    out.write(answer)
    return answer


def item(id_, question="What?", *turns):
  return {"id": id_, "conversations": [{"from": "human", "value": question}, *turns]}


def write_manifest(path, items):
  path.write_text(json.dumps(items))
  return path


def records(path):
  """The results file as parsed lines; fails unless it is valid JSONL ending in a newline."""
  text = path.read_text()
  assert text.endswith("\n")
  return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "error: flag --batch-size=0: 0 is not a positive integer"),
    (["--batch-size", "-1"], "error: flag --batch-size=-1: -1 is not a positive integer"),
    (["--max-new-tokens", "0"], "error: flag --max-new-tokens=0: 0 is not a positive integer"),
    (["--temperature", "-1"], "error: flag --temperature=-1: -1.0 is not a non-negative number"),
    (["--top-p", "1.5"], "error: flag --top-p=1.5: 1.5 is not a number in the range [0, 1]"),
    (["--out", "{tmp}"], "error: {tmp}: is a folder; --out takes a results file such as {tmp}/results.jsonl"),
    (["--out", "{tmp}/no/r.jsonl"], "error: {tmp}/no/r.jsonl: --out's folder {tmp}/no does not exist"),
    (["--out", "{tmp}/../{name}/m.json"], "error: {tmp}/../{name}/m.json: --out is the manifest itself; "
                                          "write the results to another file"),
    (["--out", "{tmp}/r.jsonl", "stray"], "error: unexpected arguments: stray"),
    (["--quantize", "int4"], "error: flag --quantize=int4: value should be one of <none|int8>"),
])
def test_bad_flags_are_one_line_before_the_model_loads(args, message, tmp_path):
  manifest = write_manifest(tmp_path / "m.json", [item("a")])
  fill = {"tmp": tmp_path, "name": tmp_path.name}
  args = ["--batch", str(manifest), "--out", str(tmp_path / "r.jsonl"), *NO_MODEL, *[a.format(**fill) for a in args]]
  run = subprocess.run([sys.executable, "infer.py", *args], cwd=ROOT, capture_output=True, text=True)
  assert (run.returncode, run.stderr.splitlines()) == (1, [message.format(**fill)])
  assert manifest.read_text() == json.dumps([item("a")])


@pytest.mark.parametrize("items, message", [
    ([item(1), item("1"), item(None), item("ok"), item("None")],
     "ids must be unique as strings (1 and \"1\" are one id, null is 'None'); "
     "repeated: '1' (items 0, 1); 'None' (items 2, 4)"),
    ([item("a"), {"id": "b", "conversations": [{"from": "gpt", "value": "An answer, no question."}]}],
     "item(s) with no human turn to answer: 1 ('b')"),
])
def test_bad_manifest_is_refused_before_the_model_loads(items, message, tmp_path, capsys, monkeypatch):
  manifest = write_manifest(tmp_path / "m.json", items)
  code, _, err = run_cli(["--batch", str(manifest), "--out", str(tmp_path / "r.jsonl"), *NO_MODEL],
                         capsys=capsys, monkeypatch=monkeypatch)
  assert (code, err.splitlines()) == (1, [f"error: {manifest}: {message}"])
  assert not (tmp_path / "r.jsonl").exists()


def test_missing_audio_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
  code, _, err = run_cli(["--audio", str(tmp_path / "nope.wav"), *NO_MODEL], capsys=capsys, monkeypatch=monkeypatch)
  assert (code, err.splitlines()) == (1, [f"error: {tmp_path / 'nope.wav'}: no such file"])


def test_rerun_keeps_one_line_per_id_and_mends_a_half_written_line(tmp_path, capsys, monkeypatch):
  manifest = write_manifest(tmp_path / "m.json", [item("a", "A?"), item("b", "bad B?"), item("c", "C?")])
  out = tmp_path / "r.jsonl"
  # Lines of ids this manifest does not ask for are someone else's: kept, errors included.
  out.write_text('{"id": "other", "output": "kept"}\n{"id": "gone", "error": "kept too"}\n')
  args = ["--batch", str(manifest), "--out", str(out), "--batch-size", "2"]
  for run in range(3):
    bot = StandIn()
    monkeypatch.setattr(infer, "_load", lambda bot=bot: bot)
    code, _, err = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 1 and "1 of 3 item(s) failed" in err
    assert bot.asked == (["A?", "C?"] if run == 0 else [])  # "b" fails before the model is asked
    # Other lines keep their places; this manifest's ids keep its order, the retried failure included.
    assert records(out) == [
        {"id": "other", "output": "kept"}, {"id": "gone", "error": "kept too"}, {"id": "a", "output": "ok: A?"},
        {"id": "b", "error": "bad B?: not a readable audio file"}, {"id": "c", "output": "ok: C?"}]
    with open(out, "a") as f:
      f.write('{"id": "b", "outp')  # a crash mid-line, mended by the next run


def test_interrupted_batch_keeps_a_valid_results_file(tmp_path, capsys, monkeypatch):
  manifest = write_manifest(tmp_path / "m.json", [item(str(i), f"Q{i}?") for i in range(5)])
  out = tmp_path / "r.jsonl"
  monkeypatch.setattr(infer, "_load", lambda: StandIn(interrupt_at=2))
  code, _, err = run_cli(["--batch", str(manifest), "--out", str(out), "--batch-size", "2"], capsys=capsys,
                         monkeypatch=monkeypatch)
  assert code == cli.INTERRUPTED and err.splitlines()[-1].startswith("interrupted; 2 request(s) in")
  assert records(out) == [{"id": "0", "output": "ok: Q0?"}, {"id": "1", "output": "ok: Q1?"}]


@pytest.mark.parametrize("text, line", [
    ('{"id": "a", "output": "x"}\nnot json\n{"id": "b", "output": "y"}\n', 2),
    ('{"id": "a", "output": "x"}\n{"id": "b", "answer": "y"}\n', 2),
    ('Some notes of mine', 1),  # not begun as a results line: not mistaken for a half-written one
])
def test_a_file_that_is_not_a_results_file_is_left_alone(text, line, tmp_path, capsys, monkeypatch):
  manifest = write_manifest(tmp_path / "m.json", [item("a")])
  out = tmp_path / "r.jsonl"
  out.write_text(text)
  code, _, err = run_cli(["--batch", str(manifest), "--out", str(out), *NO_MODEL], capsys=capsys,
                         monkeypatch=monkeypatch)
  assert (code, err.splitlines()) == (1, [f'error: {out}: line {line} is not a results record ({{"id", '
                                          f'"output"|"error"}}); move the file or fix that line'])
  assert out.read_text() == text


def test_chat_commands():
  bot, out, err = StandIn(), io.StringIO(), io.StringIO()
  script = "/help\n/audio\n/audio   \n/reset now\n/exitnow\nHi\n/exit\nignored\n"
  assistant.run_chat(bot, io.StringIO(script), out, err)
  assert bot.asked == ["Hi"] and out.getvalue() == "ok: Hi\n"
  assert err.getvalue().splitlines() == [
      "error: unknown command /help; the commands are /audio PATH, /reset, /exit",
      "error: usage: /audio PATH", "error: usage: /audio PATH", "error: usage: /reset",
      "error: unknown command /exitnow; the commands are /audio PATH, /reset, /exit"]


def test_ctrl_c_ends_a_chat_with_the_summary(capsys, monkeypatch):
  def typed():
    yield "Hi\n"
    raise KeyboardInterrupt

  monkeypatch.setattr(infer, "_load", StandIn)
  code, out, err = run_cli(["--chat", *NO_MODEL], typed(), capsys=capsys, monkeypatch=monkeypatch)
  assert (code, out) == (cli.INTERRUPTED, "ok: Hi\n")
  assert err.splitlines()[-2:] == ["", err.splitlines()[-1]] and err.splitlines()[-1].startswith(
      "interrupted; 1 request(s) in")
  assert err.startswith("ready to chat: type a message") and len(err.splitlines()) == 3


def test_a_rerun_with_every_item_answered_does_not_load_the_model(tmp_path, capsys, monkeypatch):
  manifest = write_manifest(tmp_path / "m.json", [item("a", "A?"), item("b", "B?")])
  out = tmp_path / "r.jsonl"
  monkeypatch.setattr(infer, "_load", StandIn)
  args = ["--batch", str(manifest), "--out", str(out), *NO_MODEL]
  code, _, err = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
  assert code == 0 and f"all 2 item(s) answered, in {out}" in err.splitlines()
  monkeypatch.setattr(infer, "_load", lambda: pytest.fail("the model was loaded"))
  code, _, err = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
  assert (code, err.splitlines()) == (0, [f"all 2 item(s) answered, in {out}; nothing to do"])


@pytest.mark.parametrize("args, sampling", [
    (["--prompt", "Say hi."], {"temperature": None, "top_p": None}),
    (["--prompt", "Say hi.", "--temperature", "0"], {"temperature": None, "top_p": None, "do_sample": False}),
])
def test_a_question_without_audio_and_temperature_0(args, sampling, capsys, monkeypatch):
  """--prompt alone asks about no audio; --temperature 0 is greedy, as the server takes it."""
  bot = StandIn()
  monkeypatch.setattr(infer, "_load", lambda: bot)
  code, out, _ = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
  assert (code, out) == (0, "ok: Say hi.\n")
  assert bot.conversations == [[{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]]
  assert infer._sampling() == sampling


def test_neither_audio_prompt_chat_nor_batch_is_refused(capsys, monkeypatch):
  code, _, err = run_cli(NO_MODEL, capsys=capsys, monkeypatch=monkeypatch)
  assert (code, err.splitlines()) == (1, ["error: give one of --audio (with --prompt, or not), --prompt alone (a "
                                          "question without audio), --chat or --batch"])


def test_the_summary_counts_the_time_spent_answering_only(monkeypatch):
  """A chat waits on its user between turns: tokens/s is over the answering."""
  clock = iter([10.0, 12.0, 100.0, 101.0])  # two answers, 88 s of typing between them
  monkeypatch.setattr(assistant.time, "perf_counter", lambda: next(clock))
  stats = assistant.Stats(requests=2, new_tokens=30)
  for _ in range(2):
    with stats.answering():
      pass
  assert stats.summary() == ("2 request(s) in 3.0 s: time to first token n/a (not streamed), 10.0 new tokens/s, "
                             "0.0 s of audio")
