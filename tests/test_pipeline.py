"""The training input pipeline: unusable samples are replaced by usable ones (every row of every
batch is a real sample), counted and named; a manifest with nothing usable is an error; samples are
cut at `max_length`."""

import logging

import numpy as np
import pytest
import soundfile as sf

from af3_jax import Processor
from af3_jax.data import pipeline
from af3_jax.data.manifest import Sample
from af3_jax.train_step import IGNORE

pytest.importorskip("torch")  # the tokenizer fixture is built with transformers


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
  (root / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
  return root


def batches(samples, processor, n, **kw):
  args = dict(rows=2, windows_per_row=1, buckets=(64, 128, 1024), max_length=1024, seed=0, epochs=None,
              workers=0, source="m.json")
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
