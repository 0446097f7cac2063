"""The training input pipeline (grain): manifests -> shuffled, host-sharded, padded numpy batches.

Audio decoding and log-mel run in grain worker processes. Each batch has static shapes: `rows` rows
right-padded to the smallest length bucket that fits (longer samples are cut at the last bucket, as
upstream cuts at model_max_length, dropping the audio frames cut off with them) and `rows * max_windows`
audio windows (unused ones empty). A sample whose audio cannot be read is skipped with a warning that
names it; each batch counts its skips in `skipped`. The iterator's state is checkpointable with
`grain.checkpoint.CheckpointSave`, so a resumed run continues with the next unseen batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain
import numpy as np

from af3_jax.audio import features
from af3_jax.data.manifest import Sample
from af3_jax.processor import IGNORE, Processor

_FRAMES_PER_WINDOW = features.FRAMES // 4


@dataclasses.dataclass(frozen=True)
class Encode:
  """Sample -> tokens, labels and audio arrays; or {"skipped": id} when its audio cannot be used (an
  unreadable file, or more windows in all than a batch row holds)."""

  processor: Processor
  windows_per_row: int

  def __call__(self, sample: Sample) -> dict:
    try:
      e = self.processor.encode(sample.conversation, add_generation_prompt=False)
      n_windows = sum(len(a.frames) for a in e.audios)
      if n_windows > self.windows_per_row:
        raise ValueError(f"{n_windows} audio windows in all, more than the {self.windows_per_row} a row holds")
    except ValueError as err:
      logging.warning("skipping sample %s: %s", sample.id, err)
      return {"skipped": sample.id}
    frames = [n for a in e.audios for n in a.frames]
    feats = [a.features for a in e.audios]
    masks = [a.features_mask for a in e.audios]
    return {"ids": np.asarray(e.ids, np.int32), "labels": np.asarray(e.labels, np.int32),
            "features": np.concatenate(feats) if feats else np.zeros((0, features.N_MELS, features.FRAMES), np.float32),
            "features_mask": np.concatenate(masks) if masks else np.zeros((0, features.FRAMES), np.int32),
            "frames": np.asarray(frames, np.int32)}


@dataclasses.dataclass(frozen=True)
class Collate:
  """A list of encoded samples -> one padded batch of fixed shapes (see the module docstring)."""

  rows: int
  windows_per_row: int
  buckets: tuple[int, ...]
  pad_id: int
  audio_token_id: int

  def __call__(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
    kept = [r for r in records if "skipped" not in r]
    longest = max([len(r["ids"]) for r in kept], default=1)
    length = next((b for b in self.buckets if b >= longest), self.buckets[-1])
    windows = self.rows * self.windows_per_row
    out = {"input_ids": np.full((self.rows, length), self.pad_id, np.int32),
           "attention_mask": np.zeros((self.rows, length), np.int32),
           "labels": np.full((self.rows, length), IGNORE, np.int32),
           "input_features": np.zeros((windows, features.N_MELS, features.FRAMES), np.float32),
           "input_features_mask": np.zeros((windows, features.FRAMES), np.int32),
           "audio_embed_mask": np.zeros((windows, _FRAMES_PER_WINDOW), bool),
           "skipped": np.int32(len(records) - len(kept))}
    for row, r in enumerate(kept):
      w = row * self.windows_per_row  # row-aligned, so rows (and micro-batches) split with their audio
      ids = r["ids"][:length]
      out["input_ids"][row, :len(ids)] = ids
      out["attention_mask"][row, :len(ids)] = 1
      out["labels"][row, :len(ids)] = r["labels"][:length]
      n_windows = len(r["frames"])
      out["input_features"][w:w + n_windows] = r["features"]
      out["input_features_mask"][w:w + n_windows] = r["features_mask"]
      # Frames whose <sound> tokens were cut off with the tail are dropped too, keeping counts equal.
      budget = int((ids == self.audio_token_id).sum())
      for frames in r["frames"]:
        used = min(int(frames), budget)
        out["audio_embed_mask"][w, :used] = True
        budget -= used
        w += 1
    return out


def train_batches(samples: Sequence[Sample], processor: Processor, *, rows: int, windows_per_row: int,
                  buckets: Sequence[int], seed: int, epochs: int | None, workers: int, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """This host's share of the samples, shuffled, encoded and collated into batches of `rows`.

  epochs None repeats forever. Every host draws the same permutation and takes every
  `process_count`-th sample of it from `process_index` on.
  """
  # Shuffle, then shard: each step's global batch holds the samples a single process would read
  # (in another row order), so the token-mean loss does not depend on the number of hosts.
  ds = grain.MapDataset.source(list(samples)).shuffle(seed=seed)[process_index::process_count]
  ds = ds.repeat(epochs).map(Encode(processor, windows_per_row))
  collate = Collate(rows, windows_per_row, tuple(buckets), processor.tokenizer.pad_token_id or 0,
                    processor.audio_token_id)
  it = ds.to_iter_dataset().batch(rows, batch_fn=collate, drop_remainder=True)
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


def steps_per_epoch(n_samples: int, rows: int, process_count: int = 1) -> int:
  return (n_samples // process_count) // rows
