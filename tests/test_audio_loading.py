"""`load_audio` against a plain numpy restatement of NVIDIA's `_load_audio` rules, and its errors.

Every file is written into tmp_path with soundfile from seeded random signals.
"""

import re
import warnings

import librosa
import numpy as np
import pytest
import soundfile as sf

from af3_jax import audio
from af3_jax.audio import loading

SR = audio.SAMPLE_RATE


def nvidia_rules(path, mp3: bool = False, max_seconds: float | None = None) -> np.ndarray:
  """docs/upstream.md#audio-loading, step by step on the whole file: scale, resample every channel, pick, normalise."""
  data, sr = sf.read(path, dtype="float64", always_2d=True)
  if max_seconds is not None:
    data = data[:int(max_seconds * sr)]
  lo, hi = data.min(), data.max()
  if lo < -1 or hi > 1:
    data = data / max(abs(hi), abs(lo))
  if sr != SR:
    data = np.stack([librosa.resample(data[:, c], orig_sr=sr, target_sr=SR, res_type="soxr_hq")
                     for c in range(data.shape[1])], axis=1)
  x = data.mean(axis=1) if mp3 else data[:, 0]
  lo, hi = x.min(), x.max()
  x = 2 * x / abs(hi) - 1 if lo >= 0 else x / max(abs(hi), abs(lo))
  return ((np.clip(x, -1, 1) * 32767).astype(np.int16) / 32767).astype(np.float32)


def tones(seconds: float, sr: int, channels: int, seed: int) -> np.ndarray:
  """(frames, channels): a different random tone plus noise per channel, peak below 1."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * sr))[:, None] / sr
  x = np.sin(2 * np.pi * rng.uniform(100, 2000, channels) * t) + 0.2 * rng.standard_normal((t.size, channels))
  return 0.7 * x / np.abs(x).max()


# name: (file name, samples, sample rate, soundfile subtype)
FILES = {
    "wav_int16_stereo_44k": ("a.wav", tones(1.5, 44100, 2, 0), 44100, "PCM_16"),
    "flac": ("a.flac", tones(1.0, SR, 1, 1), SR, "PCM_16"),
    "ogg": ("a.ogg", tones(1.0, 48000, 2, 2), 48000, "VORBIS"),
    "float_wav_over_one": ("a.wav", 3.0 * tones(1.0, 22050, 2, 3), 22050, "FLOAT"),
    "wav_8k": ("a.wav", tones(1.0, 8000, 1, 4), 8000, "PCM_16"),
    "wav_non_negative": ("a.wav", 0.25 + 0.5 * np.abs(tones(1.0, SR, 1, 5)), SR, "FLOAT"),
}


@pytest.mark.parametrize("name", FILES)
def test_matches_nvidia_rules(name, tmp_path):
  filename, data, sr, subtype = FILES[name]
  path = tmp_path / filename
  sf.write(path, data, sr, subtype=subtype)
  out = audio.load_audio(path)
  assert out.dtype == np.float32 and out.ndim == 1
  assert out.size == -(-sf.info(path).frames * SR // sr)  # librosa's ceil(n * 16000 / sr)
  np.testing.assert_array_equal(out, nvidia_rules(path))


def test_multichannel_keeps_channel_zero(tmp_path):
  data = tones(1.0, SR, 4, 6)
  data[:, 0] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)  # channel 0 is the only clean tone
  path = tmp_path / "quad.wav"
  sf.write(path, data, SR, subtype="FLOAT")
  out = audio.load_audio(path)
  np.testing.assert_array_equal(out, nvidia_rules(path))
  expected = ((data[:, 0] / np.abs(data[:, 0]).max() * 32767).astype(np.int16) / 32767).astype(np.float32)
  np.testing.assert_array_equal(out, expected)


def test_mp3_averages_channels(tmp_path):
  if "MP3" not in sf.available_formats():  # libsndfile >= 1.1 built with mpg123 and lame
    pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) has no mp3 support")
  path = tmp_path / "a.mp3"
  sf.write(path, tones(1.0, 44100, 2, 7), 44100, format="MP3")
  np.testing.assert_array_equal(audio.load_audio(path), nvidia_rules(path, mp3=True))


def test_mp3_falls_back_to_the_decoder(tmp_path, monkeypatch):
  data = tones(1.0, 22050, 2, 8)
  path = tmp_path / "a.mp3"
  path.write_bytes(b"not decodable by libsndfile")

  def decoder(p, **kwargs):
    assert p == str(path) and kwargs["duration"] == 2.0 and kwargs["mono"] is False
    return data.T, 22050

  monkeypatch.setattr(loading.librosa, "load", decoder)
  wav = tmp_path / "same.wav"  # the same samples through the soundfile path, for the reference
  sf.write(wav, data, 22050, subtype="DOUBLE")
  np.testing.assert_array_equal(audio.load_audio(path, max_seconds=2.0), nvidia_rules(wav, mp3=True))


def test_max_seconds_reads_only_the_start(tmp_path):
  path = tmp_path / "long.wav"
  sf.write(path, tones(3.0, 44100, 2, 9), 44100, subtype="PCM_16")
  out = audio.load_audio(path, max_seconds=1.25)
  assert out.size == int(1.25 * SR)
  np.testing.assert_array_equal(out, nvidia_rules(path, max_seconds=1.25))


def test_silence_stays_finite(tmp_path):
  path = tmp_path / "silence.wav"
  sf.write(path, np.zeros((SR, 2)), SR, subtype="PCM_16")
  out = audio.load_audio(path)
  np.testing.assert_array_equal(out, np.zeros(SR, np.float32))
  assert np.isfinite(audio.extract_features([out])[0]).all()


def _float_wav_with(value):
  def write(path):
    data = tones(0.5, SR, 1, 10)
    data[100] = value
    sf.write(path, data, SR, subtype="FLOAT")
  return write


def _copy_of_cut(src_suffix: str, subtype: str, keep):
  """A valid file cut down to `keep(n_bytes)` bytes."""
  def write(path):
    full = path.with_suffix(".full" + src_suffix)
    sf.write(full, tones(1.0, SR, 1, 11), SR, subtype=subtype)
    raw = full.read_bytes()
    path.write_bytes(raw[:keep(len(raw))])
  return write


BAD = {
    "missing": ("nope.wav", None),
    "directory": ("dir.wav", lambda p: p.mkdir()),
    "zero_bytes": ("empty.wav", lambda p: p.touch()),
    "header_no_samples": ("none.wav", lambda p: sf.write(p, np.zeros((0, 1)), SR, subtype="PCM_16")),
    "text_as_wav": ("text.wav", lambda p: p.write_text("not audio at all\n" * 20)),
    "text_as_mp3": ("text.mp3", lambda p: p.write_text("not audio at all\n" * 20)),
    "truncated_wav_header": ("cut.wav", _copy_of_cut(".wav", "PCM_16", lambda n: 30)),
    "truncated_flac": ("cut.flac", _copy_of_cut(".flac", "PCM_16", lambda n: n // 2)),
    "nan": ("nan.wav", _float_wav_with(np.nan)),
    "inf": ("inf.wav", _float_wav_with(np.inf)),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_value_error(name, tmp_path):
  filename, make = BAD[name]
  path = tmp_path / filename
  if make is not None:
    make(path)
  with pytest.raises(ValueError) as info:
    audio.load_audio(path)
  message = str(info.value)
  assert str(path) in message and "\n" not in message


def _wav_cut_at(path, seconds: float, keep_seconds: float):
  """A 16 kHz int16 mono WAV of `seconds` whose bytes stop after `keep_seconds` (header unchanged)."""
  sf.write(path, tones(seconds, SR, 1, 12), SR, subtype="PCM_16")
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) - 2 * int(seconds * SR) + 2 * int(keep_seconds * SR)])
  return path


@pytest.mark.parametrize("style, max_seconds", [("nvidia", None), ("hf", None), ("nvidia", 1.5)])
def test_truncated_wav_warns_naming_the_file(tmp_path, style, max_seconds):
  path = _wav_cut_at(tmp_path / "cut.wav", 2.0, 1.0)
  expected = f"{path}: truncated: its header promises 2.00 s of audio but the file holds 1.00 s"
  with pytest.warns(UserWarning, match=re.escape(expected)):
    out = audio.load_audio(path, max_seconds, style=style)
  assert out.size == SR


def _streamed_wav(path):
  """A WAV written to a pipe: RIFF and data sizes are 0xFFFFFFFF placeholders, the samples run to the end."""
  sf.write(path, tones(1.0, SR, 1, 13), SR, subtype="PCM_16")
  raw = bytearray(path.read_bytes())
  raw[4:8] = raw[40:44] = b"\xff\xff\xff\xff"
  path.write_bytes(bytes(raw))
  return path


@pytest.mark.parametrize("make, max_seconds", [
    (lambda p: _wav_cut_at(p, 2.0, 1.0), 0.5),  # the read stops before the cut, on purpose
    (lambda p: _wav_cut_at(p, 2.0, 2.0), None),  # complete
    (_streamed_wav, None),
], ids=["stops_before_the_cut", "complete", "streamed"])
def test_wavs_read_in_full_do_not_warn(tmp_path, make, max_seconds):
  path = make(tmp_path / "a.wav")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert audio.load_audio(path, max_seconds).size == int((max_seconds or sf.info(path).duration) * SR)
