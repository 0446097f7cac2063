"""Audio from a request into 16 kHz mono waveforms: base64 bytes (`input_audio`, `data:` URLs, uploads)
and local files under the server's `--allowed-local-media-path` only. Nothing is fetched from the
network. Every problem is a one-line ValueError naming the request field.

Audio longer than the model takes (`max_seconds`: AF3's 20 windows of 30 s, 10 minutes; Music Flamingo's
40, 20 minutes) is refused rather than cut: a request never gets an answer about less audio than it sent.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import urllib.parse
from pathlib import Path

import numpy as np

from af3_jax.audio import features
from af3_jax.audio.loading import load_audio

MAX_SECONDS = features.MAX_WINDOWS * features.WINDOW_SAMPLES // features.SAMPLE_RATE  # 600
FORMATS = ("wav", "mp3", "flac", "ogg")
_MIME = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
         "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac", "audio/ogg": "ogg"}


def from_file(path: str | os.PathLike, where: str, style: str, max_seconds: int = MAX_SECONDS,
              named: bool = True) -> np.ndarray:
  """The waveform of an audio file, loaded by the processor's rules for `style`; ValueError when it
  cannot be read or is longer than `max_seconds`, naming the request's field `where` and, when `named`,
  the file (a temporary file's name means nothing to a client). Reading a second past the limit tells a
  longer file from one of exactly the limit, and any file within the limit is read whole, as the
  processor reads it."""
  try:
    wave = load_audio(path, max_seconds=max_seconds + 1, style=style)
  except ValueError as e:
    if named:
      raise ValueError(f"{where}: {e}") from None
    path = os.fspath(path)
    raise ValueError(f"{where}: {str(e).removeprefix(f'{path}: ').replace(path, 'the file')}") from None
  if len(wave) > max_seconds * features.SAMPLE_RATE:
    raise ValueError(f"{where}: the audio is longer than {max_seconds // 60:g} minutes, the most the model takes; "
                     "cut it first")
  return wave


def from_bytes(data: bytes, fmt: str, where: str, style: str, max_seconds: int = MAX_SECONDS) -> np.ndarray:
  """The waveform of an encoded audio file's bytes; `fmt` ("wav", "mp3"...; "" to let the decoder tell)
  names the container, which decides the mp3 fallback decoder."""
  if not data:
    raise ValueError(f"{where}: the audio is empty (0 bytes)")
  with tempfile.NamedTemporaryFile(suffix=f".{fmt}" if fmt else "") as f:
    f.write(data)
    f.flush()
    return from_file(f.name, where, style, max_seconds, named=False)


def from_base64(data: str, fmt: str, where: str, style: str, max_seconds: int = MAX_SECONDS) -> np.ndarray:
  """The waveform of base64 audio. Line breaks and spaces are skipped (`base64` wraps its output at 76
  characters; vLLM skips them too); any other character outside the alphabet is an error, not skipped."""
  try:
    raw = base64.b64decode("".join(data.split()), validate=True)
  except (binascii.Error, ValueError) as e:
    raise ValueError(f"{where}: not valid base64 ({e})") from None
  return from_bytes(raw, fmt, where, style, max_seconds)


def from_url(url: str, where: str, style: str, allowed: Path | None, max_seconds: int = MAX_SECONDS) -> np.ndarray:
  """An `audio_url`: a `data:audio/...;base64,` URL, or a local file (a file:// URL or a path, as vLLM
  takes them) inside `allowed` (symlinks resolved first, so a link cannot lead out)."""
  scheme = urllib.parse.urlsplit(url).scheme
  if scheme == "data":
    head, _, payload = url[len("data:"):].partition(",")
    mime, *params = head.split(";")
    if "base64" not in params:
      raise ValueError(f"{where}: only base64 data URLs are taken (data:audio/wav;base64,...)")
    fmt = _MIME.get(mime.lower())
    if fmt is None:
      raise ValueError(f"{where}: unsupported audio type {mime!r}; send one of {', '.join(sorted(_MIME))}")
    return from_base64(payload, fmt, where, style, max_seconds)
  if scheme in ("http", "https"):
    raise ValueError(f"{where}: the server does not fetch audio from the network; send it as input_audio "
                     "or a data: URL")
  if scheme not in ("", "file"):
    raise ValueError(f"{where}: audio_url must be a data: URL or a local file, got a {scheme}: URL")
  if allowed is None:
    raise ValueError(f"{where}: local files are off; start the server with --allowed-local-media-path DIR to "
                     "read files under DIR")
  path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url).resolve()
  if not path.is_relative_to(allowed):
    raise ValueError(f"{where}: {url} is outside --allowed-local-media-path {allowed}")
  return from_file(path, where, style, max_seconds)
