"""The training input pipeline (grain): manifests -> shuffled, host-sharded, padded numpy batches.

Audio decoding and log-mel run in grain worker processes. Every sample is cut at `max_length` tokens
(upstream's model_max_length, dropping the audio frames cut off with the tail). Each batch has static
shapes: `rows` rows right-padded to the smallest length bucket that fits, and `rows * max_windows`
audio windows (unused ones empty). A sample that cannot be used (unreadable audio, too many windows,
nothing left to learn from) is skipped with a warning that names it and replaced by the next usable
one, so every row of every batch is a real sample; each batch counts the samples skipped to fill it
in `skipped`. The iterator's state is checkpointable with `grain.checkpoint.CheckpointSave`, so a
resumed run continues with the next unseen batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain
import numpy as np

from af3_jax.audio import features
from af3_jax.data.manifest import Sample
from af3_jax.processor import TOKENS_PER_WINDOW, Processor
from af3_jax.train_step import IGNORE


@dataclasses.dataclass(frozen=True)
class Encode:
  """Sample -> tokens and labels cut at `max_length`, and its audio arrays; or {"skipped": id} when
  the sample cannot be used: an unreadable file, more windows in all than a batch row holds, or no
  supervised token (no assistant turn, or every answer cut off at `max_length`)."""

  processor: Processor
  windows_per_row: int
  max_length: int

  def __call__(self, sample: Sample) -> dict:
    try:
      e = self.processor.encode(sample.conversation, add_generation_prompt=False)
      n_windows = sum(len(a.frames) for a in e.audios)
      if n_windows > self.windows_per_row:
        raise ValueError(f"{n_windows} audio windows in all, more than the {self.windows_per_row} a row holds")
      labels = np.asarray(e.labels[:self.max_length], np.int32)
      if (labels == IGNORE).all():
        raise ValueError(f"no assistant answer to learn from in its first {self.max_length} tokens")
    except ValueError as err:
      logging.warning("skipping sample %s: %s", sample.id, err)
      return {"skipped": sample.id}
    frames = [n for a in e.audios for n in a.frames]
    feats = [a.features for a in e.audios]
    masks = [a.features_mask for a in e.audios]
    return {"ids": np.asarray(e.ids[:self.max_length], np.int32), "labels": labels,
            "features": np.concatenate(feats) if feats else np.zeros((0, features.N_MELS, features.FRAMES), np.float32),
            "features_mask": np.concatenate(masks) if masks else np.zeros((0, features.FRAMES), np.int32),
            "frames": np.asarray(frames, np.int32)}


class NothingUsable(ValueError):
  """Every sample of a full pass over the data was skipped: training would never see a row."""


class SkipUnusable(grain.IterDataset):
  """Drops Encode's {"skipped": id} records. Each record kept carries `skipped`, the number dropped
  since the one before it. When every one of the `samples` samples (this host's share of `source`)
  is dropped, `NothingUsable` is raised instead of searching forever."""

  def __init__(self, parent: grain.IterDataset, *, samples: int, source: str):
    super().__init__(parent)
    self.samples = samples
    self.source = source

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipUnusableIterator(self._parent.__iter__(), self.samples, self.source)


class _SkipUnusableIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, samples: int, source: str):
    super().__init__(parent)
    self.samples = samples
    self.source = source

  def __next__(self) -> dict:
    dropped = 0
    while "skipped" in (record := next(self._parent)):
      dropped += 1
      # Epochs may be shuffled differently, but any 2n records in a row hold one whole epoch of n.
      if dropped >= 2 * self.samples:
        raise NothingUsable(f"{self.source}: none of its {self.samples} sample(s) can be used "
                            "(see the warnings above); nothing to train on")
    return {**record, "skipped": dropped}

  # Between two records nothing is pending, so the parent's position is the whole state.
  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


@dataclasses.dataclass(frozen=True)
class Collate:
  """A list of encoded samples -> one padded batch of fixed shapes (see the module docstring)."""

  rows: int
  windows_per_row: int
  buckets: tuple[int, ...]
  pad_id: int
  audio_token_id: int

  def __call__(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
    longest = max(len(r["ids"]) for r in records)
    length = next(b for b in self.buckets if b >= longest)
    fill = {"input_ids": self.pad_id, "labels": IGNORE}
    out = {k: np.full(shape, fill.get(k, 0), dtype)
           for k, (shape, dtype) in batch_shapes(self.rows, self.windows_per_row, length).items()}
    out["skipped"] = np.int32(sum(r["skipped"] for r in records))
    for row, r in enumerate(records):
      w = row * self.windows_per_row  # row-aligned, so rows (and micro-batches) split with their audio
      ids = r["ids"]
      out["input_ids"][row, :len(ids)] = ids
      out["attention_mask"][row, :len(ids)] = 1
      out["labels"][row, :len(ids)] = r["labels"]
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


def batch_shapes(rows: int, windows_per_row: int, length: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The model inputs of a batch of `rows` rows padded to `length`: name -> (shape, dtype)."""
  windows = rows * windows_per_row
  return {"input_ids": ((rows, length), np.dtype(np.int32)),
          "attention_mask": ((rows, length), np.dtype(np.int32)),
          "labels": ((rows, length), np.dtype(np.int32)),
          "input_features": ((windows, features.N_MELS, features.FRAMES), np.dtype(np.float32)),
          "input_features_mask": ((windows, features.FRAMES), np.dtype(np.int32)),
          "audio_embed_mask": ((windows, TOKENS_PER_WINDOW), np.dtype(bool))}


def length_buckets(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
  """The padded lengths a run uses: the configured ones below `max_length`, then `max_length`."""
  if max_length < 1:
    raise ValueError(f"data.max_length must be at least 1, got {max_length}")
  return tuple(sorted({b for b in buckets if 0 < b < max_length} | {max_length}))


def train_batches(samples: Sequence[Sample], processor: Processor, *, rows: int, windows_per_row: int,
                  buckets: Sequence[int], max_length: int, seed: int, epochs: int | None, workers: int,
                  source: str, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """This host's share of the samples, shuffled, encoded and collated into batches of `rows`.

  epochs None repeats forever. Every host draws the same permutation and takes every
  `process_count`-th sample of it from `process_index` on. `source` names the data in errors (the
  manifests).
  """
  # Shuffle, then shard: each step's global batch holds the samples a single process would read
  # (in another row order), so the token-mean loss does not depend on the number of hosts.
  ds = grain.MapDataset.source(list(samples)).shuffle(seed=seed)[process_index::process_count]
  per_host = len(ds)
  ds = ds.repeat(epochs).map(Encode(processor, windows_per_row, max_length)).to_iter_dataset()
  collate = Collate(rows, windows_per_row, length_buckets(buckets, max_length),
                    processor.tokenizer.pad_token_id or 0, processor.audio_token_id)
  it = SkipUnusable(ds, samples=per_host, source=source).batch(rows, batch_fn=collate, drop_remainder=True)
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


def steps_per_epoch(n_samples: int, rows: int, process_count: int = 1) -> int:
  return (n_samples // process_count) // rows
