"""Audio files to 16 kHz mono float32, by NVIDIA's or transformers' loading rules (docs/upstream.md#audio-loading).

style "nvidia" mirrors `llava/utils/media.py::_load_audio` in the NVIDIA repo: read at most
`max_seconds`, scale float files that overshoot [-1, 1], resample with soxr_hq, keep channel 0 (mp3: the
channel mean), peak normalise, then round-trip through int16.
style "hf" mirrors transformers' `audio_utils.load_audio` soundfile backend: float32, channel mean,
soxr_hq, raw amplitude.
Every bad input is a one-line `ValueError` naming the file.
"""

from __future__ import annotations

import os
import struct
import warnings

import librosa
import numpy as np
import soundfile as sf

from af3_jax.audio.features import SAMPLE_RATE


def _error(path: str, problem: str) -> ValueError:
  """A one-line ValueError naming the file; decoder messages can span lines."""
  return ValueError(f"{path}: {' '.join(problem.split())}")


def _why(err: Exception) -> str:
  return str(err) or type(err).__name__  # audioread's NoBackendError has no message


def _read_soundfile(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
  """(frames, channels) float64 samples and the sample rate, reading only the first `max_seconds`."""
  with sf.SoundFile(path) as f:
    frames = -1 if max_seconds is None else int(max_seconds * f.samplerate)
    return f.read(frames=frames, dtype="float64", always_2d=True), f.samplerate


def _read_decoder(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
  """The mp3 fallback when libsndfile cannot decode a file: librosa's audioread path."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # librosa warns that soundfile failed and that audioread is deprecated
    y, sr = librosa.load(path, sr=None, mono=False, duration=max_seconds, dtype=np.float64)
  return np.atleast_2d(y).T, sr  # librosa gives (channels, frames), or (frames,) for mono


def _read(path: str, max_seconds: float | None, is_mp3: bool) -> tuple[np.ndarray, int]:
  """(frames, channels) float64 samples and the sample rate: soundfile, then the decoder for mp3."""
  # Decoders raise many exception types (LibsndfileError, EOFError, NoBackendError, ...); every one of
  # them means the file cannot be decoded, which is the caller's problem to report, not a crash.
  try:
    return _read_soundfile(path, max_seconds)
  except Exception as err:
    if not is_mp3:
      raise _error(path, f"not a readable audio file ({_why(err)})") from None
    first = err
  try:
    return _read_decoder(path, max_seconds)
  except Exception as err:
    raise _error(path, f"not a readable mp3 file ({_why(first)}; fallback decoder: {_why(err)})") from None


def _truncated_wav_seconds(path: str) -> float | None:
  """The seconds a RIFF/WAVE header promises when its data chunk runs past the end of the file (the file
  was cut short); None when it does not, for other formats, and for streamed WAVs, whose data size is a
  0 or 0xFFFFFFFF placeholder."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    if (head := f.read(12))[:4] != b"RIFF" or head[8:] != b"WAVE":
      return None
    byte_rate = 0
    while len(chunk := f.read(8)) == 8:
      name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
      start = f.tell()
      if name == b"fmt " and len(fmt := f.read(12)) == 12:
        byte_rate = struct.unpack("<8xI", fmt)[0]  # nAvgBytesPerSec
      if name == b"data":
        cut = length not in (0, 0xFFFFFFFF) and start + length > size
        return length / byte_rate if cut and byte_rate else None
      f.seek(start + length + length % 2)  # chunks are padded to an even size
  return None


def _warn_if_truncated(path: str, frames: int, sr: int, max_seconds: float | None) -> None:
  """libsndfile reads a WAV whose header promises more than the file holds as a shorter file, silently:
  warn, unless the read stopped at `max_seconds` before the cut anyway."""
  promised = _truncated_wav_seconds(path)
  if promised is not None and (max_seconds is None or frames < int(max_seconds * sr)):
    warnings.warn(f"{path}: truncated: its header promises {promised:.2f} s of audio but the file holds "
                  f"{frames / sr:.2f} s; loading what is there")


def _peak_normalize(x: np.ndarray) -> np.ndarray:
  """NVIDIA's peak normalisation: non-negative signals map to [-1, 1], others are divided by the peak."""
  peak = np.abs(x).max()
  if peak == 0:
    # Upstream divides 0 by 0 here and an all-silent file becomes NaN; keeping zeros keeps features finite.
    return x
  return 2 * x / peak - 1 if x.min() >= 0 else x / peak


def load_audio(path: str | os.PathLike, max_seconds: float | None = 600.0, *, style: str = "nvidia") -> np.ndarray:
  """Loads the first `max_seconds` (None: all) of an audio file as (T,) float32, mono, 16 kHz.

  WAV, FLAC, OGG and anything else libsndfile reads go through soundfile; mp3 falls back to librosa's
  decoder when soundfile fails. Raises ValueError for a missing, empty, undecodable or non-finite file;
  warns (UserWarning, naming the file) when a WAV holds less audio than its header promises.
  """
  path = os.fspath(path)
  if style not in ("nvidia", "hf"):
    raise ValueError(f"style must be 'nvidia' or 'hf', got {style!r}")
  if max_seconds is not None and not (max_seconds > 0 and np.isfinite(max_seconds)):
    raise ValueError(f"max_seconds must be a positive, finite number of seconds, got {max_seconds}")
  if not os.path.exists(path):
    raise _error(path, "no such file")
  if os.path.isdir(path):
    raise _error(path, "is a directory, not an audio file")
  if os.path.getsize(path) == 0:
    raise _error(path, "is empty (0 bytes)")
  is_mp3 = path.lower().endswith(".mp3")
  data, sr = _read(path, max_seconds, is_mp3)
  _warn_if_truncated(path, len(data), sr, max_seconds)
  if data.size == 0:
    raise _error(path, "has no audio samples")
  if not np.isfinite(data).all():
    raise _error(path, "contains NaN or Inf samples")
  if style == "hf":
    return _transformers_rules(data, sr)
  peak = np.abs(data).max()
  if peak > 1:  # float files may overshoot; NVIDIA scales all channels by the one peak
    data = data / peak
  # NVIDIA keeps channel 0 of soundfile reads; for mp3, pydub resamples and then averages the channels.
  # NVIDIA resamples every channel before picking channel 0, but soxr treats channels independently
  # (bit-identical), so picking first gives the same samples for a fraction of the work.
  if not is_mp3:
    data = data[:, :1]
  if sr != SAMPLE_RATE:
    # res_type pinned: librosa's default changed across versions; NVIDIA ran with soxr_hq (librosa >= 0.10).
    data = librosa.resample(data, orig_sr=sr, target_sr=SAMPLE_RATE, res_type="soxr_hq", axis=0)
  x = _peak_normalize(data.mean(axis=1))
  # The int16 round trip truncates toward zero (astype), as upstream does before windowing.
  return ((np.clip(x, -1, 1) * 32767).astype(np.int16) / 32767.0).astype(np.float32)


def _transformers_rules(data: np.ndarray, sr: int) -> np.ndarray:
  """transformers' soundfile path: float32 samples, channel mean in float32, soxr_hq to ceil(T * 16k / sr)."""
  x = data.astype(np.float32).mean(axis=1, dtype=np.float32)
  if sr != SAMPLE_RATE:
    x = librosa.resample(x, orig_sr=sr, target_sr=SAMPLE_RATE, res_type="soxr_hq")
  return np.ascontiguousarray(x, dtype=np.float32)
