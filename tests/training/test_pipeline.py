"""The training input pipeline: unusable samples are replaced by usable ones (every row of every
batch is a real sample), counted and named; a manifest with nothing usable is an error; samples are
cut at `max_length`. Packed rows keep each sample whole, with its audio windows, and NVIDIA's first
label rule; the packed iterator resumes with the next unseen batch."""

import itertools
import logging

import grain
import numpy as np
import pytest
import soundfile as sf
from absl import flags

from af3_jax import Processor
from af3_jax.data.manifest import Sample
from af3_jax.data.processor import IGNORE
from af3_jax.training import pipeline



def sample(id_: str, audio=None, answer: str | None = "A dog barking.") -> Sample:
  user = [{"type": "text", "text": "What is in this audio?"}]
  if audio is not None:
    user.insert(0, {"type": "audio", "path": str(audio)})
  turns = [{"role": "user", "content": user}]
  if answer is not None:
    turns.append({"role": "assistant", "content": answer})
  return Sample(id_, turns)


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
  return Processor.from_pretrained(tokenizer_dir, style="nvidia", max_windows=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  root = tmp_path_factory.mktemp("clips")
  sf.write(root / "good.wav", 0.1 * np.random.default_rng(0).standard_normal(16000), 16000)
  for seconds in (2, 3):  # more clips of other lengths: other audio token counts
    noise = np.random.default_rng(seconds).standard_normal(16000 * seconds)
    sf.write(root / f"{seconds}s.wav", 0.1 * noise, 16000)
  (root / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
  return root


def batches(samples, processor, n, **kw):
  args = dict(rows=2, windows_per_row=1, buckets=(64, 128, 1024), max_length=1024, packing=False, seed=0,
              epochs=None, workers=0, source="m.json")
  it = pipeline.train_batches(samples, processor, **{**args, **kw})
  return [next(it) for _ in range(n)]


def test_unusable_samples_are_replaced_counted_and_named(processor, clips, caplog):
  samples = [sample("ok1", clips / "good.wav"), sample("bad1", clips / "broken.wav"), sample("text"),
             sample("noanswer", answer=None), sample("ok2", clips / "good.wav"),
             sample("bad2", clips / "missing.wav")]
  with caplog.at_level(logging.WARNING):
    out = batches(samples, processor, 6)  # 4 passes over the 3 usable samples
  for b in out:  # every row holds a sample with tokens to learn from
    assert b["attention_mask"].any(axis=1).all() and (b["labels"] != IGNORE).any(axis=1).all()
  assert sum(int(b["skipped"]) for b in out) in (11, 12)  # 3 unusable per pass, the last pass maybe cut short
  for name in ("bad1", "broken.wav", "noanswer", "no assistant answer", "bad2", "missing.wav"):
    assert name in caplog.text
  # Each pass meets them again: one warning each all the same.
  assert sorted(r.getMessage().split()[2] for r in caplog.records) == ["bad1", "bad2", "noanswer"]


def test_nothing_usable_is_an_error_naming_the_source(processor, clips):
  samples = [sample("bad", clips / "broken.wav"), sample("noanswer", answer=None)]
  with pytest.raises(pipeline.NothingUsable, match="m.json: none of its 2 sample"):
    batches(samples, processor, 1)


def test_samples_are_cut_at_max_length(processor, clips):
  long_answer = " ".join(["The dog barks at the music."] * 40)
  (b,) = batches([sample("a", clips / "good.wav", long_answer), sample("t")], processor, 1, max_length=100,
                 buckets=(64, 128, 4096))
  assert b["input_ids"].shape[1] == 100  # the configured buckets above max_length give way to it
  assert b["attention_mask"].sum(axis=1).max() == 100
  assert pipeline.length_buckets((64, 128, 4096), 100) == (64, 100)


def mixed(clips):
  """Samples with audio of 1, 2 and 3 s and text only, each with its own answer."""
  return [sample("one", clips / "good.wav", "A dog barking."), sample("text", answer="No audio here."),
          sample("two", clips / "2s.wav", "Music plays loudly."), sample("three", clips / "3s.wav", "Rain."),
          sample("text2", answer="Nothing to hear, only words.")]


def segments(batch, windows_per_row, audio_token_id):
  """Each sample of a packed batch: (its ids, labels, positions, features, audio_embed_mask), in order.
  A row's windows go to its samples in their order, as many to each as it has <sound> tokens' worth."""
  out = []
  for row in range(batch["input_ids"].shape[0]):
    w = row * windows_per_row
    for k in range(1, batch["segment_ids"][row].max() + 1):
      at = batch["segment_ids"][row] == k
      tokens = int((batch["input_ids"][row][at] == audio_token_id).sum())
      n = 0
      while tokens > 0:  # the windows whose selected frames fill this sample's audio tokens
        tokens -= int(batch["audio_embed_mask"][w + n].sum())
        n += 1
      assert tokens == 0
      out.append((batch["input_ids"][row][at], batch["labels"][row][at], batch["position_ids"][row][at],
                  batch["input_features"][w:w + n], batch["audio_embed_mask"][w:w + n]))
      w += n
  return out


def test_packed_rows_hold_whole_samples_with_their_windows(processor, clips):
  """Each sample of a packed batch is the sample encoded alone: its tokens and labels, positions from
  0, and its own audio windows in its row; rows hold several samples and fewer padding slots."""
  encode = pipeline.Encode(processor, windows_per_row=3, max_length=1024)
  alone = {tuple(e["ids"]): e for e in map(encode, mixed(clips))}
  kw = dict(rows=2, windows_per_row=3, buckets=(64, 128, 256, 1024), max_length=256)
  (packed,) = batches(mixed(clips), processor, 1, packing=True, **kw)
  (padded,) = batches(mixed(clips), processor, 1, **kw)
  assert pipeline.samples_in(packed) > pipeline.samples_in(padded) == 2
  assert packed["attention_mask"].mean() > padded["attention_mask"].mean()
  assert (packed["attention_mask"] == (packed["segment_ids"] > 0)).all()
  seen = segments(packed, 3, processor.audio_token_id)
  assert len(seen) == pipeline.samples_in(packed) and any(len(f) == 0 for *_, f, _ in seen)
  for ids, labels, positions, feats, embed_mask in seen:
    e = alone[tuple(ids)]
    np.testing.assert_array_equal(labels, e["labels"])  # its first label (<|im_start|>) is ignored anyway
    np.testing.assert_array_equal(positions, np.arange(len(ids)))
    np.testing.assert_array_equal(feats, e["features"])
    np.testing.assert_array_equal(embed_mask.sum(-1), e["frames"])


def test_packing_ignores_each_samples_first_label_and_nothing_else():
  """NVIDIA's rule (`repack_multimodal_data`): the label of each packed sample's first token becomes
  -100; every other label stays. Here every token is supervised, so the rule shows."""
  rng = np.random.default_rng(0)
  records = [{"ids": rng.integers(0, 299, n).astype(np.int32), "features": np.zeros((0, 128, 3000), np.float32),
              "features_mask": np.zeros((0, 3000), np.int32), "frames": np.zeros(0, np.int32), "skipped": 0}
             for n in (5, 9, 3, 7)]
  for r in records:
    r["labels"] = r["ids"].copy()
  packed = pipeline.pack(grain.MapDataset.source(records).to_iter_dataset(), rows=2, windows_per_row=1,
                         max_length=16)
  (batch,) = list(packed.batch(2, batch_fn=pipeline.Collate(2, 1, (16,), pad_id=0, packed=True)))
  assert pipeline.samples_in(batch) == 4 and batch["segment_ids"].max() == 2  # two samples a row
  changed = batch["labels"] != batch["input_ids"]
  np.testing.assert_array_equal(changed, (batch["position_ids"] == 0) | (batch["segment_ids"] == 0))
  assert (batch["labels"][changed] == IGNORE).all()


def test_packed_skips_are_counted(processor, clips):
  """Every unusable sample before the last one packed is counted once, in the batch it was skipped for."""
  samples = [sample("ok1", clips / "good.wav"), sample("bad1", clips / "broken.wav"), sample("text"),
             sample("noanswer", answer=None), sample("ok2", clips / "2s.wav"),
             sample("bad2", clips / "missing.wav")]
  out = batches(samples, processor, 4, packing=True)
  packed = sum(pipeline.samples_in(b) for b in out)
  stream = grain.MapDataset.source(samples).shuffle(seed=0)[0::1].repeat(None)  # the order the pipeline reads
  ids = (stream[i].id for i in itertools.count())
  usable, before = 0, 0
  for id_ in ids:
    usable += id_ in ("ok1", "text", "ok2")
    if usable == packed:
      break
    before += id_ not in ("ok1", "text", "ok2")
  assert packed > 8 and sum(int(b["skipped"]) for b in out) == before


def assert_same_batch(have, want):
  assert have.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(have[k], want[k], err_msg=k)


def test_packed_batches_resume_with_the_next_unseen_one(processor, clips):
  """From a saved state, and after `peek`, which leaves the iterator where it was."""
  kw = dict(rows=2, windows_per_row=3, buckets=(64, 128, 256), max_length=256, packing=True, seed=0, epochs=None,
            workers=0, source="m.json")
  it = pipeline.train_batches(mixed(clips), processor, **kw)
  next(it)
  state = it.get_state()
  peeked = pipeline.peek(it)
  expected = [next(it) for _ in range(2)]
  resumed = pipeline.train_batches(mixed(clips), processor, **kw)
  resumed.set_state(state)
  for have, want in zip([peeked, *(next(resumed) for _ in expected)], [expected[0], *expected]):
    assert_same_batch(have, want)


def test_peek_with_worker_processes(processor, clips):
  """train.py peeks at the first batch with grain's worker processes decoding (data.workers)."""
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags, which train.py parses (app.run)
    flags.FLAGS.mark_as_parsed()
  it = pipeline.train_batches(mixed(clips), processor, rows=2, windows_per_row=3, buckets=(256,), max_length=256,
                              packing=True, seed=0, epochs=None, workers=1, source="m.json")
  assert_same_batch(pipeline.peek(it), next(it))
  it.close()


@pytest.mark.parametrize("packing", [False, True])
def test_a_batch_padded_to_another_hosts_bucket_is_collated_at_that_bucket(processor, clips, packing):
  """What train.py does when another host chose a longer bucket: the batch equals the one collated at
  that length in the first place."""
  kw = dict(packing=packing, windows_per_row=3 if packing else 1, rows=1, max_length=2048)
  (short,) = batches(mixed(clips), processor, 1, buckets=(1024,), **kw)
  (long,) = batches(mixed(clips), processor, 1, buckets=(2048,), **kw)
  assert short["input_ids"].shape[1] < long["input_ids"].shape[1] == 2048
  assert_same_batch(pipeline.pad_length(short, 2048, processor.tokenizer.pad_token_id or 0), long)
