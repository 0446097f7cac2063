"""Helpers the tests share (fixtures live in conftest.py), by noun: here the checkout's root, the files
the program tests share and the random inputs every kind of test draws; `tiny` the tiny model shapes,
`reference` PyTorch's models of them and their outputs, `parity` the float32 bound ours must meet,
`attention` attention's reference masks, `sharding` sharding checks, `processes` multi-process runs,
`events` TensorBoard records read back. Running the programs themselves is in programs.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # for the annotations alone, so that helpers.tiny stays the one place to import them from
  from helpers.tiny import Tester, Tiny

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the programs and bench/ run from here
CHOICES = [["Man", "Woman", "Child", "Robot"], ["wind", "wharf"], ["A dog barking", "A cat", "Birds", "Rain", "Wind"],
           ["Lake", "A cooking competition", "A motorsport racing event", "A live concert", "A political rally",
            "Forest", "Desert", "Sea"]]
CLIPS = {"a.wav": 3.0, "b.flac": 2.0}  # seconds: 300 and 200 mel frames


def audio_tokens(mel_frames: int) -> int:
  """Upstream's token count for a window with `mel_frames` valid frames (conv2, then the pool)."""
  conv = (mel_frames - 1) // 2 + 1
  return max((conv - 2) // 2 + 1, 0)


def random_features(rng: np.random.Generator, mel_frames: list[int], mel_bins: int = 128,
                    window: int = 3000) -> tuple[np.ndarray, np.ndarray]:
  """(windows, mel_bins, window) features and the (windows, window) mask for the given valid frame counts."""
  feats = rng.standard_normal((len(mel_frames), mel_bins, window)).astype(np.float32)
  mask = (np.arange(window)[None, :] < np.asarray(mel_frames)[:, None]).astype(np.int32)
  return feats, mask


def random_text(rng: np.random.Generator, tiny: Tiny, n: int) -> np.ndarray:
  return rng.integers(0, tiny.audio_token_id, n)


def left_pad(rows: list[np.ndarray], pad_id: int = 0, extra: int = 0) -> dict[str, np.ndarray]:
  """`input_ids` and `attention_mask` (batch, longest + extra): rows left padded with `pad_id`."""
  width = max(map(len, rows)) + extra
  return dict(input_ids=np.stack([np.pad(r, (width - len(r), 0), constant_values=pad_id) for r in rows]),
              attention_mask=np.stack([np.pad(np.ones_like(r), (width - len(r), 0)) for r in rows]))


def random_prompts(rng: np.random.Generator, tester: Tester, mel_frames: list[int]):
  """One unpadded prompt per window (4 + 3i text ids, the window's `<sound>` tokens, 5 text ids), and
  the windows' (windows, mel bins, window) features and (windows, window) mask."""
  feats, mask = random_features(rng, mel_frames, tester.num_mel_bins, tester.window)
  rows = [np.concatenate([tester.text(rng, 4 + 3 * i), np.full(audio_tokens(n), tester.audio_token_id),
                          tester.text(rng, 5)]) for i, n in enumerate(mel_frames)]
  return rows, feats, mask
