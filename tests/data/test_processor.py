"""Processor: token parity with transformers' AudioFlamingo3Processor, the NVIDIA style, labels, e2e."""

import re
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

import af3_jax
from af3_jax import Processor
from af3_jax.audio import features
from af3_jax.checkpoints.tiny import CHAT_TEMPLATE as HF_TEMPLATE, MUSIC_CHAT_TEMPLATE as MUSIC_TEMPLATE

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def ours(tokenizer_dir):
  return Processor.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def nvidia(tokenizer_dir):
  return Processor.from_pretrained(tokenizer_dir, style="nvidia")


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
  return transformers.AudioFlamingo3Processor(
      feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
      tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir), chat_template=HF_TEMPLATE)


def wave(seconds: float, seed: int) -> np.ndarray:
  return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def user(*items):
  return {"role": "user", "content": list(items)}


def text(t):
  return {"type": "text", "text": t}


def audio(x):
  return {"type": "audio", "audio": x}


def assert_matches_reference(ours_out, ref_out):
  for key in ("input_ids", "attention_mask", "input_features_mask"):
    if key in ref_out:
      np.testing.assert_array_equal(ours_out[key], ref_out[key].numpy(), err_msg=key)
  assert ("input_features" in ours_out) == ("input_features" in ref_out)
  if "input_features" in ref_out:
    np.testing.assert_allclose(ours_out["input_features"], ref_out["input_features"].numpy(), atol=1e-4, rtol=0)


CASES = {
    "single audio": [[user(text("What is in this audio?"), audio(wave(7.3, 0)))]],
    "batch of different lengths": [[user(audio(wave(3.0, 1)), text("Describe the sound."))],
                                   [user(text("Transcribe the input speech."), audio(wave(41.0, 2)))]],
    "text only": [[user(text("What is in this audio?"))], [user(text("Hello"))]],
    "multi-turn": [[{"role": "system", "content": "You answer briefly."},
                    user(audio(wave(5.0, 3)), text("What is in this audio?")),
                    {"role": "assistant", "content": [text("A dog barking.")]},
                    user(text("And the music?"))]],
}


@pytest.mark.parametrize("case", CASES)
def test_hf_style_matches_transformers(ours, reference, case):
  conversations = CASES[case]
  ref = reference.apply_chat_template(conversations, tokenize=True, add_generation_prompt=True, return_dict=True)
  assert_matches_reference(ours.apply_chat_template(conversations), ref)


def runs(ids, token):
  """Lengths of the consecutive runs of `token` in a 1-D id array."""
  edges = np.diff(np.concatenate([[0], (ids == token).astype(int), [0]]))
  return list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))


def exact_tokens(seconds):
  _, mask, _ = features.extract_features([np.zeros(int(seconds * 16000), np.float32)])
  conv = (mask.sum(-1) - 1) // 2 + 1
  return list((conv - 2) // 2 + 1)


def test_sound_tags_place_audios_in_order(ours):
  a, b = wave(7.3, 4), wave(45.0, 5)
  conv = [user(audio(a), audio(b), text("Compare <sound-2> with <sound-1>, then <sound-2> again."))]
  out = ours.apply_chat_template(conv)
  n_a, n_b = sum(exact_tokens(7.3)), sum(exact_tokens(45.0))
  assert runs(out["input_ids"][0], ours.audio_token_id) == [n_b, n_a, n_b]
  feats = lambda x: features.extract_features([x])[0]
  np.testing.assert_array_equal(out["input_features"], np.concatenate([feats(b), feats(a), feats(b)]))


def test_audios_in_several_turns_expand_in_order(ours):
  a, b = wave(2.0, 6), wave(31.0, 7)
  conv = [user(audio(a), text("First?")), {"role": "assistant", "content": "One."}, user(audio(b), text("Second?"))]
  out = ours.apply_chat_template(conv)
  assert runs(out["input_ids"][0], ours.audio_token_id) == [sum(exact_tokens(2.0)), sum(exact_tokens(31.0))]
  assert out["input_features"].shape == (3, 128, 3000)


def test_nvidia_style_counts_and_layout(nvidia):
  """7.3 s -> 182 exact -> 180; 45 s -> 750 + 375 -> 750 + 380 (frames from the padded region)."""
  out = nvidia.apply_chat_template([user(audio(wave(7.3, 8)), text(" What is it? "))])
  decoded = nvidia.tokenizer.decode(out["input_ids"][0])
  assert decoded.endswith("<|im_start|>user\n" + "<sound>" * 180 + "\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
  assert out["audio_embed_mask"].sum() == 180 and out["audio_embed_mask"].shape == (1, 750)
  out = nvidia.apply_chat_template([user(audio(wave(45.0, 9)), text("Describe."))])
  assert out["audio_embed_mask"].sum(-1).tolist() == [750, 380]
  assert nvidia.tokenizer.decode(out["input_ids"][0]).endswith(
      "user\n" + "<sound>" * 750 + "\n" + "<sound>" * 380 + "\nDescribe.<|im_end|>\n<|im_start|>assistant\n")


def test_nvidia_output_feeds_the_model(nvidia, gqa_ckpt):
  """The embed mask takes padded-region frames; the model accepts the counts (no mismatch error)."""
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  out = nvidia.apply_chat_template([user(audio(wave(45.0, 10)), text("Describe."))])
  logits = model(**out)
  assert logits.shape == (*out["input_ids"].shape, gqa_ckpt.tiny.vocab)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("style", ["hf", "nvidia"])
def test_labels_supervise_only_assistant_content(tokenizer_dir, style):
  proc = Processor.from_pretrained(tokenizer_dir, style=style)
  conv = [user(audio(wave(2.0, 11)), text("What is in this audio?")),
          {"role": "assistant", "content": "A dog barking."},
          user(text("And then?")),
          {"role": "assistant", "content": [text("Music plays.")]}]
  out = proc.apply_chat_template([conv, conv[:2]], add_generation_prompt=False, return_labels=True)
  expected = [["A dog barking.<|im_end|>", "Music plays.<|im_end|>"], ["A dog barking.<|im_end|>"]]
  for ids, labels, answers in zip(out["input_ids"], out["labels"], expected, strict=True):
    kept = labels != -100
    np.testing.assert_array_equal(labels[kept], ids[kept])
    supervised = proc.tokenizer.decode(np.where(kept, ids, proc.tokenizer.pad_token_id)).split("[PAD]")
    assert [s for s in supervised if s] == answers


def test_think_appends_the_suffix(ours):
  out = ours.apply_chat_template([user(text("What is it?"))], think=True)
  assert ours.tokenizer.decode(out["input_ids"][0]).endswith(
      "What is it?\nPlease think and reason about the input audio before you respond.<|im_end|>\n"
      "<|im_start|>assistant\n")


@pytest.mark.parametrize("conv, message", [
    ([{"role": "robot", "content": "hi"}], "role"),
    ([user({"type": "image", "url": "x"})], "items are"),
    ([user(audio(np.zeros((2, 100))))], "1-D"),
    ([user(text("<sound-2>"), audio(wave(1.0, 0)))], "<sound-2> but the conversation has 1 audio"),
])
def test_bad_conversations(ours, conv, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    ours.apply_chat_template(conv)


def test_file_to_logits_matches_transformers(ours, reference, gqa_ckpt, tmp_path):
  """A 22.05 kHz stereo WAV -> our processor -> our model equals transformers' processor -> torch model."""
  rng = np.random.default_rng(12)
  t = np.arange(int(9.5 * 22050)) / 22050
  stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * rng.standard_normal(t.size)], axis=1)
  path = tmp_path / "clip.wav"
  sf.write(path, stereo, 22050, subtype="PCM_16")
  conv = [user({"type": "audio", "path": str(path)}, text("What is in this audio?"))]
  ref = reference.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
  out = ours.apply_chat_template(conv)
  assert_matches_reference(out, ref)
  logits = np.asarray(af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)(**out))
  with torch.no_grad():
    expected = gqa_ckpt.torch_model(**ref).logits.numpy()
  assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.fixture(scope="module")
def music(music_model_dir):
  return Processor.from_pretrained(music_model_dir)  # config.json says musicflamingo


@pytest.fixture(scope="module")
def music_reference(music_tokenizer_dir):
  return transformers.MusicFlamingoProcessor(
      feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
      tokenizer=transformers.AutoTokenizer.from_pretrained(music_tokenizer_dir), chat_template=MUSIC_TEMPLATE)


LONG = "20 minutes and 10 s"  # past the 40 windows
MUSIC_CASES = {**CASES, LONG: [[user(text("Describe the song."), audio(wave(1210.0, 13)))]]}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == LONG else c for c in MUSIC_CASES])
def test_music_flamingo_matches_transformers(music, music_reference, case):
  """bos, `<sound>` x frames, eos for each audio; its system turn; 40 windows (1,200 s) at most."""
  conversations = MUSIC_CASES[case]
  ref = music_reference.apply_chat_template(conversations, tokenize=True, add_generation_prompt=True,
                                            return_dict=True)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = music.apply_chat_template(conversations)
  assert_matches_reference(out, ref)
  if case == LONG:
    assert out["input_features"].shape[0] == 40
    assert any("only the first 40 windows (1200 s) are used" in str(w.message) for w in caught)


def test_music_flamingo_frames_each_audio(music):
  """Audios in one message and in two turns (beyond transformers, which takes one audio a
  conversation): each is `<|sound_bos|>`, its run, `<|sound_eos|>`."""
  a, b, c = wave(2.0, 14), wave(31.0, 15), wave(5.0, 16)
  conv = [user(audio(a), audio(b), text("Compare them.")), {"role": "assistant", "content": "Done."},
          user(audio(c), text("And this?"))]
  decoded = music.tokenizer.decode(music.apply_chat_template(conv)["input_ids"][0])
  framed = lambda seconds: "<|sound_bos|>" + "<sound>" * sum(exact_tokens(seconds)) + "<|sound_eos|>"
  assert f"user\n{framed(2.0)}{framed(31.0)}Compare them.<|im_end|>" in decoded
  assert f"user\n{framed(5.0)}And this?<|im_end|>" in decoded


def test_music_flamingo_needs_its_tokens_and_style(music_model_dir, tokenizer_dir):
  with pytest.raises(ValueError, match="takes the hf prompt style"):
    Processor.from_pretrained(music_model_dir, style="nvidia")
  with pytest.raises(ValueError, match=f"^{re.escape(str(tokenizer_dir))}: the tokenizer has no <\\|sound_bos\\|> token"):
    Processor.from_pretrained(tokenizer_dir, family="musicflamingo")


def test_missing_tokenizer_files_are_named(gqa_ckpt):
  """A model folder without a tokenizer (AutoTokenizer would quietly build an empty one)."""
  with pytest.raises(ValueError, match=f"^{re.escape(str(gqa_ckpt.hf))}: no tokenizer files .*"
                                       "missing: tokenizer.json, vocab.json, merges.txt"):
    Processor.from_pretrained(gqa_ckpt.hf)


@pytest.mark.parametrize("damage, message", [
    ({"tokenizer.json": "garbage"}, "cannot load the tokenizer"),
    ({"tokenizer_config.json": "[]"}, "cannot load the tokenizer"),
], ids=["tokenizer_not_json", "config_not_object"])
def test_damaged_tokenizer_files_are_one_line_errors(tokenizer_dir, tmp_path, damage, message):
  folder = tmp_path / "tok"
  shutil.copytree(tokenizer_dir, folder)
  for name, content in damage.items():
    (folder / name).write_text(content)
  with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}: {message}") as info:
    Processor.from_pretrained(folder)
  assert "\n" not in str(info.value)


def test_a_tokenizer_without_the_audio_token_is_named(tokenizer_dir):
  with pytest.raises(ValueError, match=f"^{re.escape(str(tokenizer_dir))}: the tokenizer has no <bark> token"):
    Processor.from_pretrained(tokenizer_dir, audio_token="<bark>")
