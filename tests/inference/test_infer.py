"""infer.py end to end on a tiny checkpoint: single and two audios, chat on stdin, batch with a bad item
and a resume, and bad input as one line with a non-zero exit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT
from programs import assert_answers_as_transformers, run_cli
from af3_jax.checkpoints.tiny import CHAT_TEMPLATE as HF_TEMPLATE

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")



def test_single_audio_answer_equals_transformers_greedy(model_dir, clips, capsys, monkeypatch):
  assert_answers_as_transformers(model_dir, transformers.AudioFlamingo3Processor,
                                 transformers.AudioFlamingo3ForConditionalGeneration, HF_TEMPLATE, clips / "a.wav",
                                 "What is in this audio?", capsys, monkeypatch)


def test_two_audios(model_dir, clips, capsys, monkeypatch):
  args = ["--model", str(model_dir), "--audio", str(clips / "a.wav"), "--audio", str(clips / "b.flac"),
          "--prompt", "Compare them.", "--greedy", "--max-new-tokens", "6"]
  code, out, err = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
  assert code == 0 and out.strip()
  assert "9.5 s of audio" in err


def test_int8_answer(model_dir, clips, capsys, monkeypatch):
  args = ["--model", str(model_dir), "--audio", str(clips / "a.wav"), "--greedy", "--quantize", "int8",
          "--max-new-tokens", "6"]
  code, out, err = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
  assert code == 0 and out.strip() and "new tokens/s" in err


def test_chat_through_stdin(model_dir, clips, capsys, monkeypatch):
  script = f"/audio {clips / 'a.wav'}\nWhat is it?\n/audio {clips / 'missing.wav'}\nAnd this?\nThanks.\n/reset\nHi\n/exit\nignored\n"
  code, out, err = run_cli(["--model", str(model_dir), "--chat", "--greedy", "--max-new-tokens", "4"], script,
                           capsys=capsys, monkeypatch=monkeypatch)
  assert code == 0
  assert len(out.splitlines()) == 4  # four answered turns; the missing file was never attached
  assert f"(attached {clips / 'a.wav'}, 3.0 s, to your next message)" in err.splitlines()
  assert f"error: {clips / 'missing.wav'}: no such file; not attached" in err.splitlines()
  assert "(new conversation)" in err
  # The clip is heard once, though the next two turns send it again with the conversation.
  assert "4 request(s)" in err and "3.0 s of audio" in err


def test_batch_with_a_bad_item_and_resume(model_dir, clips, tmp_path, capsys, monkeypatch):
  manifest = tmp_path / "eval.json"
  manifest.write_text(json.dumps([
      {"id": "one", "sound": str(clips / "a.wav"), "conversations": [{"from": "human", "value": "<sound>\nWhat?"},
                                                                     {"from": "gpt", "value": "ref"}]},
      {"id": "bad", "sound": str(clips / "broken.wav"), "conversations": [{"from": "human", "value": "What?"}]},
      {"id": "two", "sound": [str(clips / "b.flac")], "conversations": [{"from": "human", "value": "<sound-1> Hm?"}]},
      {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}]},
  ]))
  out_file = tmp_path / "results.jsonl"
  args = ["--model", str(model_dir), "--batch", str(manifest), "--out", str(out_file), "--batch-size", "2",
          "--greedy", "--max-new-tokens", "4"]
  code, _, err = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
  lines = [json.loads(line) for line in out_file.read_text().splitlines()]
  assert code == 1 and "1 of 4 item(s) failed" in err
  assert {r["id"] for r in lines if "output" in r} == {"one", "two", "text"}
  (bad,) = [r for r in lines if "error" in r]
  assert bad["id"] == "bad" and bad["error"].startswith(f"{clips / 'broken.wav'}: not a readable audio file")
  # A crash mid-write leaves a partial line: the resume drops it and redoes only the item that failed
  # (its audio may have been fixed since), whose new error line replaces the old one.
  with open(out_file, "a") as f:
    f.write('{"id": "tw')
  code, _, err = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
  assert code == 1 and "0 request(s)" in err
  assert out_file.read_text().splitlines() == [json.dumps(r) for r in lines]  # manifest order, the retry in place
  assert [r["id"] for r in lines] == ["one", "bad", "two", "text"]


@pytest.mark.parametrize("args, message", [
    (["--chat", "--model", "/nonexistent/af3"], "error: /nonexistent/af3: no such checkpoint directory"),
    (["--model", "/nonexistent/af3"], "error: give one of --audio (with --prompt, or not), --prompt alone (a "
                                      "question without audio), --chat or --batch"),
])
def test_bad_input_is_one_line_and_exit_1(args, message):
  run = subprocess.run([sys.executable, "infer.py", *args], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines() == [message]


def test_missing_audio_and_long_prompt(model_dir, clips, capsys, monkeypatch):
  code, _, err = run_cli(["--model", str(model_dir), "--audio", str(clips / "nope.wav")], capsys=capsys,
                         monkeypatch=monkeypatch)
  assert code == 1 and f"{clips / 'nope.wav'}: no such file" in err
  code, _, err = run_cli(["--model", str(model_dir), "--audio", str(clips / "a.wav"), "--max-new-tokens",
                          "40000"], capsys=capsys, monkeypatch=monkeypatch)
  assert code == 1 and "exceeds the model's context of 32768" in err


def test_think_merges_the_checkpoints_think_adapter(model_dir, clips, gqa_ckpt, capsys, monkeypatch, tmp_path):
  peft = pytest.importorskip("peft")
  args = ["--audio", str(clips / "a.wav"), "--think", "--greedy", "--max-new-tokens", "4"]
  code, _, err = run_cli(["--model", str(model_dir), *args], capsys=capsys, monkeypatch=monkeypatch)
  assert code == 1 and "--think needs a think/ or stage35/ adapter folder" in err
  with_think = tmp_path / "model"
  shutil.copytree(model_dir, with_think)
  base = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(gqa_ckpt.hf)
  lora = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.q_proj"))
  lora.save_pretrained(with_think / "think")
  code, out, err = run_cli(["--model", str(with_think), *args], capsys=capsys, monkeypatch=monkeypatch)
  assert code == 0 and out.strip(), err


@pytest.mark.slow
def test_ctrl_c_while_it_compiles_exits_130(model_dir, clips):
  """Ctrl-C cuts the first answer's XLA compile short; the process still exits 130 with its summary, not
  with a crash of the interpreter's teardown under the compile (it did about every other time). About
  25 s."""
  proc = subprocess.Popen([sys.executable, "infer.py", "--model", str(model_dir), "--audio", str(clips / "a.wav")],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "XLA_FLAGS": ""})
  for line in proc.stderr:
    if line.startswith("each new prompt size compiles once"):
      break
  time.sleep(1)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Fatal Python error" not in err, err[-2000:]
  assert err.splitlines()[-1].startswith("interrupted; ")
