"""The training input pipeline (grain): manifests -> shuffled, host-sharded, padded numpy batches.

Audio decoding and log-mel run in grain worker processes. Every sample is cut at `max_length` tokens
(upstream's model_max_length, dropping the audio frames cut off with the tail). Each batch has static
shapes: `rows` rows right-padded to the smallest length bucket that fits, and `rows * windows_per_row`
audio windows (unused ones empty), row-aligned: row r's audio is in windows r * windows_per_row on.
A row holds one sample, or with packing (`pack`) as many as fit its tokens and windows, told apart by
`segment_ids`. A sample that cannot be used (unreadable audio, too many windows, nothing left to learn
from) is skipped, with one warning that names it, and replaced by the next usable one, so every row of
every batch holds real samples; each batch counts the samples skipped to fill it in `skipped`. The
iterator's state is checkpointable with `grain.checkpoint.CheckpointSave`, so a resumed run continues
with the next unseen batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain
import numpy as np

from af3_jax.audio import features
from af3_jax.data.manifest import Sample
from af3_jax.data.processor import IGNORE, Processor, TOKENS_PER_WINDOW


@dataclasses.dataclass(frozen=True)
class Encode:
  """Sample -> tokens and labels cut at `max_length`, and its audio arrays (`frames`: the audio tokens
  each window fills); or {"skipped": id} when the sample cannot be used: an unreadable file, more
  windows in all than a batch row holds, or no supervised token (no assistant turn, or every answer cut
  off at `max_length`)."""

  processor: Processor
  windows_per_row: int
  max_length: int
  # Samples warned about: each epoch meets an unusable sample again, but one warning per sample is
  # enough (per process: each data worker holds its own copy).
  warned: set = dataclasses.field(default_factory=set, compare=False)

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
      if sample.id not in self.warned:
        self.warned.add(sample.id)
        logging.warning("skipping sample %s (each time it comes up): %s", sample.id, err)
      return {"skipped": sample.id}
    ids = np.asarray(e.ids[:self.max_length], np.int32)
    # Frames whose <sound> tokens were cut off with the tail are dropped too, keeping counts equal.
    frames = np.asarray([n for a in e.audios for n in a.frames], np.int32)
    budget = int((ids == self.processor.audio_token_id).sum())
    frames = np.clip(budget - (np.cumsum(frames) - frames), 0, frames).astype(np.int32)
    feats = [a.features for a in e.audios]
    masks = [a.features_mask for a in e.audios]
    return {"ids": ids, "labels": labels,
            "features": np.concatenate(feats) if feats else np.zeros((0, features.N_MELS, features.FRAMES), np.float32),
            "features_mask": np.concatenate(masks) if masks else np.zeros((0, features.FRAMES), np.int32),
            "frames": frames}


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


def pack(ds: grain.IterDataset, *, rows: int, windows_per_row: int, max_length: int) -> grain.IterDataset:
  """Encoded samples -> rows that each hold as many as fit in `max_length` tokens and `windows_per_row`
  audio windows, a sample's windows in the row with its tokens; `Collate(packed=True)` batches them.

  grain's best-fit packing over `rows` bins: a bin is emitted only with all the others, when a sample
  fits none, so each batch of `rows` is one such round and a checkpoint between batches has nothing
  half packed. Best fit (each sample into the fullest bin it fits) filled rows as well as first fit or a
  little better in a synthetic trial (log-normal lengths around 1,500 tokens, 16 bins of 8,192: 96.8%
  of token slots against 95.7%). Bins are not shuffled: the samples are shuffled already.
  """
  lengths = {"ids": max_length, "labels": max_length,
             "features": windows_per_row, "features_mask": windows_per_row, "frames": windows_per_row}
  return grain.experimental.BestFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=rows,
                                                   shuffle_bins=False, meta_features=("skipped",))


def _packed_row(r: dict) -> dict:
  """One row of `pack` as Collate's record: cut to the samples it holds (the packer pads at its end),
  with their segment ids (1, 2, ...) and positions (from 0 in each sample), and each sample's first
  label ignored.

  That label is NVIDIA's rule (`llava_arch.py`, `repack_multimodal_data`: `label[0] = IGNORE_INDEX` for
  every packed sample). Its labels are not shifted (the LLM's loss shifts them, position t predicting
  labels[t + 1]) and it is the first token's label, supervised or not; so it is exactly the one the
  previous sample's last token would predict, and alone a sample's first label is never predicted. So
  the packed loss is that of each sample alone, as upstream's (our first labels, the system turn's
  `<|im_start|>`, are never supervised anyway).
  """
  n = int(np.count_nonzero(r["ids_segment_ids"]))
  w = int(np.count_nonzero(r["frames_segment_ids"]))
  positions = r["ids_positions"][:n]
  return {"ids": r["ids"][:n], "labels": np.where(positions == 0, IGNORE, r["labels"][:n]),
          "segment_ids": r["ids_segment_ids"][:n], "positions": positions, "features": r["features"][:w],
          "features_mask": r["features_mask"][:w], "frames": r["frames"][:w], "skipped": sum(r["skipped"])}


@dataclasses.dataclass(frozen=True)
class Collate:
  """Encoded samples, or with `packed` the rows of `pack`, -> one padded batch of fixed shapes (see the
  module docstring); packed batches add `segment_ids` and `position_ids`."""

  rows: int
  windows_per_row: int
  buckets: tuple[int, ...]
  pad_id: int
  packed: bool

  def __call__(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
    if self.packed:
      records = [_packed_row(r) for r in records]
    longest = max(len(r["ids"]) for r in records)
    length = next(b for b in self.buckets if b >= longest)
    fill = _fill(self.pad_id)
    shapes = batch_shapes(self.rows, self.windows_per_row, length, packed=self.packed)
    out = {k: np.full(shape, fill.get(k, 0), dtype) for k, (shape, dtype) in shapes.items()}
    out["skipped"] = np.int32(sum(r["skipped"] for r in records))
    for row, r in enumerate(records):
      n, w, n_windows = len(r["ids"]), row * self.windows_per_row, len(r["frames"])
      out["input_ids"][row, :n] = r["ids"]
      out["attention_mask"][row, :n] = 1
      out["labels"][row, :n] = r["labels"]
      if self.packed:
        out["segment_ids"][row, :n] = r["segment_ids"]
        out["position_ids"][row, :n] = r["positions"]
      # Row-aligned, so rows (and micro-batches) split with their audio.
      out["input_features"][w:w + n_windows] = r["features"]
      out["input_features_mask"][w:w + n_windows] = r["features_mask"]
      out["audio_embed_mask"][w:w + n_windows] = np.arange(TOKENS_PER_WINDOW) < r["frames"][:, None]
    return out


def _fill(pad_id: int) -> dict[str, int]:
  """What padding holds, by input (0 where not named)."""
  return {"input_ids": pad_id, "labels": IGNORE}


TOKEN_INPUTS = ("input_ids", "attention_mask", "labels", "segment_ids", "position_ids")  # (rows, length)


def pad_length(batch: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """`batch` with its token inputs right-padded to `length`, as `Collate` pads them. Hosts of a
  multi-process run pick their length bucket each from their own samples; the global batch needs one."""
  if batch["input_ids"].shape[1] == length:  # one host, or the longest: nothing to copy
    return batch
  fill = _fill(pad_id)
  return {k: np.pad(v, ((0, 0), (0, length - v.shape[1])), constant_values=fill.get(k, 0)) if k in TOKEN_INPUTS else v
          for k, v in batch.items()}


def batch_shapes(rows: int, windows_per_row: int, length: int, *,
                 packed: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The model inputs of a batch of `rows` rows padded to `length`: name -> (shape, dtype)."""
  windows = rows * windows_per_row
  tokens = ((rows, length), np.dtype(np.int32))
  return {"input_ids": tokens, "attention_mask": tokens, "labels": tokens,
          **({"segment_ids": tokens, "position_ids": tokens} if packed else {}),
          "input_features": ((windows, features.N_MELS, features.FRAMES), np.dtype(np.float32)),
          "input_features_mask": ((windows, features.FRAMES), np.dtype(np.int32)),
          "audio_embed_mask": ((windows, TOKENS_PER_WINDOW), np.dtype(bool))}


def samples_in(batch: dict[str, np.ndarray]) -> int:
  """How many samples a batch holds: one a row, or with packing each row's segments (numbered from 1)."""
  if "segment_ids" in batch:
    return int(batch["segment_ids"].max(axis=1).sum())
  return batch["input_ids"].shape[0]


def length_buckets(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
  """The padded lengths a run uses: the configured ones below `max_length`, then `max_length`."""
  if max_length < 1:
    raise ValueError(f"data.max_length must be at least 1, got {max_length}")
  return tuple(sorted({b for b in buckets if 0 < b < max_length} | {max_length}))


def train_batches(samples: Sequence[Sample], processor: Processor, *, rows: int, windows_per_row: int,
                  buckets: Sequence[int], max_length: int, packing: bool, seed: int, epochs: int | None,
                  workers: int, source: str, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """This host's share of the samples, shuffled, encoded, packed if `packing`, and collated into batches
  of `rows`.

  epochs None repeats forever. Every host draws the same permutation and takes every
  `process_count`-th sample of it from `process_index` on. `source` names the data in errors (the
  manifests).
  """
  # Shuffle, then shard: without packing, each step's global batch holds the samples a single process
  # would read (in another row order), so the token-mean loss does not depend on the number of hosts.
  # Packed, each host fills its rows from its own share, so which samples share a step does.
  ds = grain.MapDataset.source(list(samples)).shuffle(seed=seed)[process_index::process_count]
  per_host = len(ds)
  ds = ds.repeat(epochs).map(Encode(processor, windows_per_row, max_length)).to_iter_dataset()
  ds = SkipUnusable(ds, samples=per_host, source=source)
  if packing:
    ds = pack(ds, rows=rows, windows_per_row=windows_per_row, max_length=max_length)
  collate = Collate(rows, windows_per_row, length_buckets(buckets, max_length),
                    processor.tokenizer.pad_token_id or 0, packed=packing)
  it = ds.batch(rows, batch_fn=collate, drop_remainder=True)
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


def peek(it: grain.DatasetIterator) -> dict[str, np.ndarray]:
  """The next batch of `train_batches`' iterator, which is left where it was: it yields that batch again."""
  state = it.get_state()
  batch = next(it)
  it.set_state(state)
  return batch
