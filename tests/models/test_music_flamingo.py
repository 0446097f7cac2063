"""Music Flamingo against transformers' MusicFlamingoForConditionalGeneration on the tiny random checkpoint
(`helpers.tiny.MUSIC`): the config, the rotary time embeddings' timestamps and angles, float32 logits (1e-4 of
the logit scale) and greedy tokens, for an audio that ends mid-window, a left-padded batch, two audios
in one prompt and audios in two turns (the window index restarts for each audio). Each audio is
`<|sound_bos|>`, its `<sound>` run and `<|sound_eos|>`, as MusicFlamingoProcessor writes it.
"""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from helpers import audio_tokens, left_pad, random_features, random_text
from helpers.parity import RTOL, assert_close
from helpers.reference import MAX_NEW, torch_generate, torch_logits

import af3_jax
from af3_jax import Processor
from af3_jax.buckets import bucket, window_bucket
from af3_jax.config import AF3Config, RoTEConfig
from af3_jax.inference.engine import Engine, Request
from af3_jax.models import rote
from convert import from_hf

torch = pytest.importorskip("torch")


def prompt(rng, tiny, audios: list[list[int]], between: int = 0) -> np.ndarray:
  """Text, then each audio (windows of the given mel frames) framed by bos/eos, `between` text tokens
  after each audio but the last (a turn), then text."""
  pieces = [random_text(rng, tiny, 5)]
  for i, frames in enumerate(audios):
    n = sum(audio_tokens(f) for f in frames)
    pieces += [[tiny.audio_bos_token_id], np.full(n, tiny.audio_token_id), [tiny.audio_eos_token_id]]
    if i < len(audios) - 1:
      pieces.append(random_text(rng, tiny, between))
  return np.concatenate([*pieces, random_text(rng, tiny, 4)]).astype(np.int64)


def music_batch(rng, tiny, rows: list[list[list[int]]], between: int = 0) -> dict[str, np.ndarray]:
  """Rows of audios (left padded); the windows of all audios in prompt order."""
  frames = [f for row in rows for audio in row for f in audio]
  feats, fmask = random_features(rng, frames)
  return dict(left_pad([prompt(rng, tiny, row, between) for row in rows]), input_features=feats,
              input_features_mask=fmask)


# Mel frames per window (3000 a full one): every audio ends mid-window; at most 3 windows and 2,048
# tokens a case, so that generate's compiles are few.
CASES = {
    "one audio ending mid-window": ([[[3000, 1234]]], 0),
    "two audios in one prompt": ([[[3000, 700], [1500]]], 0),
    "audios in two turns": ([[[900], [3000, 400]]], 7),
    "left-padded batch": ([[[900]], [[3000, 60]]], 0),
}


def case_batch(tiny, case: str) -> dict[str, np.ndarray]:
  rows, between = CASES[case]
  return music_batch(np.random.default_rng(len(case)), tiny, rows, between)


def without_rote(model: af3_jax.Model) -> af3_jax.Model:
  """The same weights as plain AF3: no rotary time embeddings."""
  module = model.module()
  module.cfg = dataclasses.replace(model.config, rote=None)
  graphdef, state = nnx.split(module)
  return af3_jax.Model(module.cfg, graphdef, state, model.mesh)


def test_config_reads_and_writes_transformers(music_ckpt, music_loaded):
  cfg = music_loaded.config
  assert (cfg.model_type, cfg.rote) == ("musicflamingo", RoTEConfig(theta=1200.0, partial_rotary_factor=0.2))
  assert (cfg.audio_bos_token_id, cfg.audio_eos_token_id) == (music_ckpt.tiny.audio_bos_token_id,
                                                              music_ckpt.tiny.audio_eos_token_id)
  back = transformers.MusicFlamingoConfig(**cfg.to_hf_dict())
  assert AF3Config.from_hf_dict(back.to_dict()) == cfg
  defaults = AF3Config.from_hf_dict(transformers.MusicFlamingoConfig().to_dict())  # its text_config is Qwen2's
  expected = AF3Config.music_flamingo()
  assert (defaults.rote, defaults.audio_bos_token_id, defaults.audio_eos_token_id) == (
      expected.rote, expected.audio_bos_token_id, expected.audio_eos_token_id)
  custom = transformers.MusicFlamingoConfig(rope_parameters={"rope_type": "default", "rope_theta": 900.0},
                                            partial_rotary_factor=0.1, audio_frame_step=0.02)
  assert AF3Config.from_hf_dict(custom.to_dict()).rote == RoTEConfig(900.0, 0.1, 0.02)


def test_loads_from_a_hub_id(music_model_dir, tmp_path, monkeypatch):
  """A hub id found in the huggingface_hub cache (tests are offline) loads as Music Flamingo, its
  processor too."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  repo = tmp_path / "models--nvidia--music-flamingo-tiny"
  shutil.copytree(music_model_dir, repo / "snapshots" / ("0" * 40))
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  model = af3_jax.from_pretrained("nvidia/music-flamingo-tiny", dtype=jnp.float32)
  assert model.config.model_type == "musicflamingo"
  assert Processor.from_pretrained("nvidia/music-flamingo-tiny").family.audio_bos == "<|sound_bos|>"


def test_orbax_copy_keeps_the_config(music_ckpt, music_loaded, tmp_path):
  from_hf.convert(str(music_ckpt.hf), tmp_path / "orbax", jnp.float32)
  copy = af3_jax.from_pretrained(tmp_path / "orbax", dtype=jnp.float32)
  assert copy.config == music_loaded.config
  for x, y in zip(jax.tree.leaves(copy.state), jax.tree.leaves(music_loaded.state), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("d, message", [
    ({"model_type": "qwen2_audio"}, "model_type 'qwen2_audio' is not supported"),
    ({"model_type": "musicflamingo", "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"model_type": "musicflamingo", "rope_parameters": {"rope_theta": 500}}, "below the 750 audio frames"),
    ({"model_type": "musicflamingo", "partial_rotary_factor": 0.6}, "turns more than the encoder's 1280"),
    ({"model_type": "musicflamingo", "audio_frame_step": 0}, "audio_frame_step must be a positive float"),
])
def test_bad_music_configs_are_named(d, message):
  with pytest.raises(ValueError, match=message):
    AF3Config.from_hf_dict(d)


# An audio 2 mel frames past 30 s ends in a window of no tokens: transformers gives that window to the
# next audio, whose windows then count from 1; so do we.
EMPTY_WINDOW = "a window of no tokens before an audio"


@pytest.mark.parametrize("case", [*CASES, EMPTY_WINDOW])
def test_timestamps_and_angles_equal_transformers(music_ckpt, music_loaded, case):
  """Window indices and times are bitwise transformers' (`_build_audio_timestamps`); the angles too
  (`MusicFlamingoRotaryEmbedding`), so their cos and sin differ only by the cos and sin routines."""
  if case == EMPTY_WINDOW:
    batch = music_batch(np.random.default_rng(0), music_ckpt.tiny, [[[3000, 2], [900]]])
  else:
    batch = case_batch(music_ckpt.tiny, case)
  ids, frames_per_window = batch["input_ids"], audio_tokens(3000)
  tokens = np.array([audio_tokens(n) for n in batch["input_features_mask"].sum(-1)])
  reference = music_ckpt.torch_model.model
  ref_times = reference._build_audio_timestamps(torch.tensor(ids), torch.tensor(tokens), frames_per_window)
  windows = rote.window_indices(jnp.asarray(ids == music_ckpt.tiny.audio_token_id), jnp.asarray(tokens))
  cfg = music_loaded.config
  times = rote.timestamps(windows, frames_per_window, cfg.rote)
  np.testing.assert_array_equal(times, ref_times.numpy())
  cos, sin = reference.pos_emb(ref_times, seq_len=frames_per_window)
  angles = np.asarray(rote.angles(times, windows, cfg.rote, cfg.encoder.hidden_size)).repeat(2, axis=-1)
  np.testing.assert_allclose(np.cos(angles), cos.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.sin(angles), sin.numpy(), atol=1e-6, rtol=0)


def test_window_indices_restart_per_audio_and_pass_over_padding():
  """Audio runs of 3 and 2 windows (a run is cut by any other token), then two windows of no tokens,
  as generate and the engine pad windows: 0 1 2 0 1, and the padding takes the last audio's count on."""
  is_audio = np.zeros((2, 40), bool)
  is_audio[0, 2:30] = True  # audio 1: windows of 10, 10, 8 tokens
  is_audio[1, 5:20] = True  # audio 2: 10 and 5, in the next row
  windows = rote.window_indices(jnp.asarray(is_audio), jnp.asarray([10, 10, 8, 10, 5, 0, 0]))
  assert windows.tolist()[:5] == [0, 1, 2, 0, 1]


def test_engine_answers_as_generate(music_ckpt, music_loaded):
  """The engine's prefill (right padded, its own window buckets) on two audios in two turns gives what
  `generate` gives the prompt alone (which the tests above hold to transformers')."""
  batch = case_batch(music_ckpt.tiny, "audios in two turns")
  expected = af3_jax.generate(music_loaded, batch, 8, do_sample=False, repetition_penalty=2.0)[0].tolist()
  with Engine(music_loaded, max_slots=2, max_len=2048) as engine:
    done = engine.submit(Request({k: v[0] if k == "input_ids" else v for k, v in batch.items()
                                  if k != "attention_mask"}, 8, do_sample=False, repetition_penalty=2.0)).result()
  assert list(done.tokens) == expected


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(music_ckpt, music_loaded, case):
  batch = case_batch(music_ckpt.tiny, case)
  ref = torch_logits(music_ckpt.torch_model, batch["input_ids"], batch["attention_mask"],
                     batch["input_features"], batch["input_features_mask"])
  valid = batch["attention_mask"].astype(bool)  # padded positions are garbage in both
  assert_close(np.asarray(music_loaded(**batch))[valid], ref[valid])


def test_logits_without_rote_are_far_from_transformers(music_ckpt, music_loaded):
  """What keeps the parity tests honest: the same weights without RoTE miss by far more than 1e-4."""
  batch = case_batch(music_ckpt.tiny, "audios in two turns")
  ref = torch_logits(music_ckpt.torch_model, batch["input_ids"], batch["attention_mask"],
                     batch["input_features"], batch["input_features_mask"])
  plain = np.asarray(without_rote(music_loaded)(**batch))
  assert np.abs(plain - ref).max() > 100 * RTOL * np.abs(ref).max()


def test_logits_bfloat16(music_ckpt):
  """bf16 weights and compute on both sides: max |diff| <= 3e-2 * max |logit|, as for AF3."""
  batch = case_batch(music_ckpt.tiny, "audios in two turns")
  ours = af3_jax.from_pretrained(music_ckpt.hf, dtype=jnp.bfloat16)(**batch)
  assert ours.dtype == jnp.bfloat16
  reference = type(music_ckpt.torch_model).from_pretrained(music_ckpt.hf, dtype=torch.bfloat16).eval()
  pos = np.maximum(np.cumsum(batch["attention_mask"], -1) - 1, 0)
  with torch.no_grad():
    ref = reference(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                    position_ids=torch.tensor(pos), input_features=torch.tensor(batch["input_features"],
                                                                                dtype=torch.bfloat16),
                    input_features_mask=torch.tensor(batch["input_features_mask"])).logits.float().numpy()
  assert_close(ours, ref, rtol=3e-2)


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(music_ckpt, music_loaded, case):
  """Greedy with repetition_penalty 2 on both sides (test_generate.py says why), stopped at an eos the
  reference meets part way."""
  batch = case_batch(music_ckpt.tiny, case)
  free = torch_generate(music_ckpt.torch_model, batch, repetition_penalty=2.0)
  assert len(np.unique(free[0])) > 2, f"degenerate reference path {free[0]}"
  eos = int(free[0, MAX_NEW // 2])
  ref = torch_generate(music_ckpt.torch_model, batch, repetition_penalty=2.0, eos_token_id=eos)
  ours = af3_jax.generate(music_loaded, batch, MAX_NEW, do_sample=False, repetition_penalty=2.0, eos_token_id=eos,
                          pad_token_id=0)
  np.testing.assert_array_equal(ours, ref)


def test_forty_windows_pad_little():
  """Every window count up to 20 minutes (40) pads by less than a quarter (the encoder's work), 20
  minutes not at all; its prompt (30,000 audio tokens, bos, eos and some text) pads by less than a
  tenth (generate's and the engine's prompt bucket) and stays within Qwen2's 32,768 positions."""
  for n in range(1, 41):
    assert n <= window_bucket(n) < 1.25 * n, n
  assert window_bucket(40) == 40
  for text in (16, 100, 400):
    prompt = 40 * 750 + 2 + text
    assert prompt <= bucket(prompt) < 1.1 * prompt and bucket(prompt) <= 32_768
