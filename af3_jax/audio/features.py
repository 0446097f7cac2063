"""Whisper log-mel features in JAX: mirrors transformers' `WhisperFeatureExtractor(feature_size=128)`.

Audio is cut into non-overlapping 30 s windows (at most 20) in numpy; every window is zero-padded to
480000 samples and turned into a (128, 3000) log-mel matrix on the default device, all windows in one
jitted batch (docs/upstream.md#log-mel-features). Shape letters: W windows, S samples per window, F mel frames (3000),
K frequency bins (201), M mel bins (128).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from af3_jax import buckets

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 480000  # 30 s
HOP = 160
N_FFT = 400
N_MELS = 128
FRAMES = 3000  # mel frames per window
MAX_WINDOWS = 20  # 10 min


def split_windows(audio: np.ndarray, max_windows: int = MAX_WINDOWS) -> list[np.ndarray]:
  """Non-overlapping 30 s chunks of a 16 kHz mono float array; only the last may be short.

  Returns clamp(ceil(T / 480000), 1, max_windows) float32 chunks (views where possible). Audio past
  `max_windows` windows is dropped with a warning; 0 samples give one empty chunk, as upstream does.
  """
  audio = np.asarray(audio, np.float32)
  if audio.ndim != 1:
    raise ValueError(f"split_windows takes 1-D mono audio, got shape {audio.shape}")
  if max_windows < 1:
    raise ValueError(f"max_windows must be at least 1, got {max_windows}")
  n = min(max(-(-audio.size // WINDOW_SAMPLES), 1), max_windows)
  kept = n * WINDOW_SAMPLES
  if audio.size > kept:
    warnings.warn(f"audio is {audio.size / SAMPLE_RATE:.2f} s long; only the first {n} windows "
                  f"({kept // SAMPLE_RATE} s) are used and {(audio.size - kept) / SAMPLE_RATE:.2f} s are dropped",
                  stacklevel=2)
  return [audio[i * WINDOW_SAMPLES:(i + 1) * WINDOW_SAMPLES] for i in range(n)]


@functools.cache
def _constants() -> tuple[np.ndarray, np.ndarray]:
  """The (N_FFT,) periodic Hann window and the (K, M) Slaney filterbank, both float32, built once."""
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic, as torch.hann_window
  # transformers' WhisperFeatureExtractor builds it in float64 (`mel_filter_bank`, equal to librosa's)
  # and uses it as float32.
  filters = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, dtype=np.float64).T
  return window.astype(np.float32), filters.astype(np.float32)


@jax.jit
def log_mel(windows: jax.Array) -> jax.Array:
  """(W, S) float32 zero-padded 30 s windows -> (W, M, F) float32 log-mel features, each window
  normalised on its own (upstream's batched torch path takes the max per row)."""
  if windows.ndim != 2 or windows.shape[1] != WINDOW_SAMPLES:
    raise ValueError(f"log_mel takes (windows, {WINDOW_SAMPLES}) samples, got shape {windows.shape}")
  window, filters = _constants()
  w = windows.shape[0]
  x = jnp.pad(windows.astype(jnp.float32), ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")  # center=True
  # Frame f covers samples [f*HOP, f*HOP + N_FFT), which is 2.5 hop blocks: build the frames from three
  # shifted block views instead of a gather. Only F frames are made: upstream drops the last of F + 1.
  blocks = x[:, :(FRAMES + 2) * HOP].reshape(w, FRAMES + 2, HOP)
  frames = jnp.concatenate([blocks[:, :FRAMES], blocks[:, 1:FRAMES + 1],
                            blocks[:, 2:, :N_FFT - 2 * HOP]], axis=-1)  # (W, F, N_FFT)
  spec = jnp.fft.rfft(frames * window, axis=-1)  # (W, F, K)
  power = spec.real**2 + spec.imag**2
  # HIGHEST so a GPU does not drop to TF32, which would break parity with the float32 reference.
  mel = jnp.einsum("wfk,km->wmf", power, filters, precision=jax.lax.Precision.HIGHEST)
  log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
  log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
  return (log_spec + 4.0) / 4.0


def extract_features(audios: list[np.ndarray],
                     max_windows: int = MAX_WINDOWS) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """Log-mel features of 16 kHz mono float audios, all windows in one batch.

  Returns features (W, M, F) float32, `input_features_mask` (W, F) int32 with ceil(len / HOP) ones per
  window, and the number of windows of each audio (W is their sum, windows in audio order).
  """
  per_audio = [split_windows(audio, max_windows) for audio in audios]
  chunks = [c for cs in per_audio for c in cs]
  batch = np.zeros((buckets.window_bucket(len(chunks)), WINDOW_SAMPLES), np.float32)
  for i, c in enumerate(chunks):
    batch[i, :c.size] = c
  features = np.asarray(log_mel(batch)[:len(chunks)])
  mel_frames = np.array([-(-c.size // HOP) for c in chunks], np.int64).reshape(-1, 1)
  mask = (np.arange(FRAMES) < mel_frames).astype(np.int32)
  return features, mask, [len(cs) for cs in per_audio]
