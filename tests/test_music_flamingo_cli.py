"""Music Flamingo through the programs, given the tiny checkpoint with its tokenizer (conftest
`music_model_dir`) and no other model flag: infer.py's answer is transformers' greedy answer through
MusicFlamingoProcessor; serve.py answers a chat with two audios in two turns as `generate` does alone;
eval.py runs in the family's prompt style (hf); train.py runs stage 4's LoRA from it."""

import json

import jax.numpy as jnp
import pytest
from programs import FAST, alone, ask, assert_answers_as_transformers, conversations, run_eval, serving, train

import af3_jax
from af3_jax.checkpoints.tiny import MUSIC_CHAT_TEMPLATE as MUSIC_TEMPLATE

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_infer_answer_equals_transformers_greedy(music_model_dir, clips, capsys, monkeypatch):  # noqa: F811
  assert_answers_as_transformers(music_model_dir, transformers.MusicFlamingoProcessor,
                                 transformers.MusicFlamingoForConditionalGeneration, MUSIC_TEMPLATE, clips / "b.flac",
                                 "Describe the song.", capsys, monkeypatch)


@pytest.mark.slow  # about 30 s on 2 cores: the server's warm-up
def test_serve_answers_as_generate(music_model_dir, media):  # noqa: F811
  with serving(music_model_dir, media) as server:
    assert server.processor.family.audio_bos == "<|sound_bos|>"
    messages, conversation = conversations(media)["two turns"]
    reply = ask(server, messages, max_tokens=8)
    text, prompt_tokens, completion_tokens = alone(server, conversation, 8)
    assert reply.choices[0].message.content == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)


def test_eval_takes_the_hf_style(music_model_dir, mmau, tmp_path, capsys):  # noqa: F811
  data, _ = mmau
  out = tmp_path / "run"
  code, _, err = run_eval(["--task", "mmau", "--data", str(data), "--model", str(music_model_dir), "--out", str(out),
                           "--limit", "2", *FAST], capsys)
  assert code == 0, err
  assert json.loads((out / "summary.json").read_text())["settings"]["style"] == "hf"


@pytest.mark.slow  # about 30 s on 2 cores: a training process compiles its step
def test_train_lora_stage(music_model_dir, run_setup, tmp_path):  # noqa: F811
  _, manifest, _ = run_setup
  code, _, err = train(tmp_path / "run", music_model_dir, manifest, "--config.total_steps=2", config="configs/tiny.py:4")
  assert code == 0, err[-2000:]
  trained = af3_jax.from_pretrained(tmp_path / "run" / "model", dtype=jnp.float32)
  assert trained.config == af3_jax.from_pretrained(music_model_dir, dtype=jnp.float32).config
