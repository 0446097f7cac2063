"""Log-mel features and 30 s windowing against transformers' `WhisperFeatureExtractor(feature_size=128)`.

The reference cuts its own chunks (plain slicing) and runs the transformers extractor on them; every
signal is drawn fresh from a seeded generator, so no expected value is copied from our own output.
"""

import functools
import warnings

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from af3_jax import audio

SR = audio.SAMPLE_RATE
WIN = audio.WINDOW_SAMPLES
# Both sides are float32: at mel bins near the M - 8 clamp, FFT rounding alone reaches ~5e-5 per side
# (more for pure tones filling a whole window), so this bound has about a 2x margin on these signals.
TOL = 1e-4


@functools.cache
def extractor() -> WhisperFeatureExtractor:
  return WhisperFeatureExtractor(feature_size=128)


def reference(x: np.ndarray, max_windows: int = audio.MAX_WINDOWS) -> tuple[np.ndarray, np.ndarray]:
  """transformers' features and per-frame mask for the chunks of `x`, cut here by slicing."""
  kept = x[:max_windows * WIN]
  chunks = [kept[i:i + WIN] for i in range(0, kept.size, WIN)] or [kept]
  out = extractor()(chunks, sampling_rate=SR, padding="max_length", return_attention_mask=True,
                    return_tensors="np")
  return out["input_features"], out["attention_mask"]


def chord(rng: np.random.Generator, seconds: float) -> np.ndarray:
  t = np.arange(int(seconds * SR)) / SR
  freqs = rng.uniform(100, 1000, 4)
  return (sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs) / 4).astype(np.float32)


def noise(rng: np.random.Generator, seconds: float) -> np.ndarray:
  return (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
  """Syllable-rate bursts of a gliding harmonic voice plus breath noise, with exact-zero pauses."""
  t = np.arange(int(seconds * SR)) / SR
  f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
  phase = 2 * np.pi * np.cumsum(f0) / SR
  voice = sum(np.sin(k * phase) / k for k in range(1, 12))
  envelope = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, np.pi)), 0, None) ** 2
  pauses = (t % 3.0) < 2.2  # 0.8 s of digital silence every 3 s
  x = envelope * pauses * (0.3 * voice + 0.05 * rng.standard_normal(t.size))
  return x.astype(np.float32)


def silence(rng: np.random.Generator, seconds: float) -> np.ndarray:
  return np.zeros(int(seconds * SR), np.float32)


SIGNALS = {
    "chord": (chord, 10.0),
    "white_noise": (noise, 12.0),
    "speech_like": (speech_like, 20.0),
    "silence": (silence, 8.0),
    "1_sample": (noise, 1 / SR),
    "29.99s": (speech_like, 29.99),
    "30s": (speech_like, 30.0),
    "30.01s": (noise, 30.01),
    "61s": (speech_like, 61.0),
}


def assert_matches_reference(x: np.ndarray, max_windows: int = audio.MAX_WINDOWS) -> None:
  feats, mask, counts = audio.extract_features([x], max_windows)
  ref_feats, ref_mask = reference(x, max_windows)
  assert feats.dtype == np.float32 and mask.dtype == np.int32
  assert feats.shape == ref_feats.shape and counts == [ref_feats.shape[0]]
  np.testing.assert_array_equal(mask, ref_mask)
  assert np.abs(feats - ref_feats).max() <= TOL


@pytest.mark.parametrize("name", SIGNALS)
def test_matches_transformers(name):
  make, seconds = SIGNALS[name]
  assert_matches_reference(make(np.random.default_rng(len(name)), seconds))


def test_eleven_minutes_keeps_twenty_windows_and_warns():
  x = speech_like(np.random.default_rng(11), 11 * 60)
  with pytest.warns(UserWarning, match=r"60\.00 s are dropped"):
    assert_matches_reference(x)


def test_max_windows_caps_windows():
  x = speech_like(np.random.default_rng(3), 61.0)
  with pytest.warns(UserWarning, match="dropped"):
    assert_matches_reference(x, max_windows=2)


def test_batch_of_audios_equals_each_alone():
  rng = np.random.default_rng(5)
  xs = [noise(rng, 12.0), speech_like(rng, 61.0), np.zeros(0, np.float32), chord(rng, 0.01)]
  feats, mask, counts = audio.extract_features(xs)
  refs = [reference(x) for x in xs]
  assert counts == [1, 3, 1, 1]
  np.testing.assert_array_equal(mask, np.concatenate([m for _, m in refs]))
  assert np.abs(feats - np.concatenate([f for f, _ in refs])).max() <= TOL


@pytest.mark.parametrize("samples,windows", [(0, 1), (1, 1), (WIN, 1), (WIN + 1, 2), (20 * WIN, 20)])
def test_split_windows_counts_and_covers_audio(samples, windows):
  x = np.random.default_rng(samples).standard_normal(samples).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing is dropped, so nothing is said
    chunks = audio.split_windows(x)
  assert len(chunks) == windows
  assert all(c.size == WIN for c in chunks[:-1])
  np.testing.assert_array_equal(np.concatenate(chunks), x)


def test_split_windows_drops_the_tail_with_a_warning():
  x = np.zeros(3 * WIN + SR // 2, np.float32)
  with pytest.warns(UserWarning, match=r"30\.50 s are dropped"):
    chunks = audio.split_windows(x, max_windows=2)
  assert [c.size for c in chunks] == [WIN, WIN]


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="1-D"):
    audio.split_windows(np.zeros((2, 100), np.float32))
  with pytest.raises(ValueError, match="480000"):
    audio.log_mel(np.zeros((1, 1000), np.float32))
