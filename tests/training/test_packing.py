"""Packed training batches against their samples alone (float32, the tiny checkpoint): in a packed
batch each sample's loss and gradients are its own, with 0, 1 and 3 audio windows, and the token-mean
loss of an accumulation window is that of the same samples padded one a row.

The batches come from the pipeline's own packer and Collate, fed records as `pipeline.Encode` makes them.
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import audio_tokens, random_features, random_text
from helpers.parity import flat

from af3_jax import sharding
from af3_jax.data.processor import IGNORE
from af3_jax.training import optimizer, pipeline, step as train_step

pytest.importorskip("torch")  # the tiny checkpoint is built with transformers

LENGTH, WINDOWS = 256, 3  # every batch here: rows of 256 tokens and 3 windows
RTOL = 1e-5


def record(tiny, rng, mel_frames, prompt, answer, supervise_all=False):
  """One encoded sample: `prompt` text ids, the <sound> tokens of windows with `mel_frames` valid mel
  frames, `answer` text ids, labels on the answer (on every token with `supervise_all`)."""
  feats, mask = random_features(rng, mel_frames)
  frames = np.asarray([audio_tokens(n) for n in mel_frames], np.int32)
  ids = np.concatenate([random_text(rng, tiny, prompt), np.full(frames.sum(), tiny.audio_token_id),
                        random_text(rng, tiny, answer)]).astype(np.int32)
  labels = ids if supervise_all else np.where(np.arange(len(ids)) < len(ids) - answer, IGNORE, ids)
  return {"ids": ids, "labels": labels.astype(np.int32), "features": feats, "features_mask": mask, "frames": frames,
          "skipped": 0}


@pytest.fixture(scope="module")
def records(gqa_ckpt):
  """Three windows (166 tokens), text only with its first token supervised (20), one window (113), one
  short window (47): best fit packs the first two into one row, the last two into the other."""
  rng = np.random.default_rng(0)
  tiny = gqa_ckpt.tiny
  return [record(tiny, rng, [300, 200, 120], 5, 6), record(tiny, rng, [], 14, 6, supervise_all=True),
          record(tiny, rng, [400], 5, 8), record(tiny, rng, [160], 3, 4)]


def collate(records, rows, packed):
  ds = grain.MapDataset.source(records).to_iter_dataset()
  if packed:
    ds = pipeline.pack(ds, rows=rows, windows_per_row=WINDOWS, max_length=LENGTH)
  (batch,) = list(ds.batch(rows, batch_fn=pipeline.Collate(rows, WINDOWS, (LENGTH,), pad_id=0, packed=packed)))
  batch.pop("skipped")
  return batch


@pytest.fixture(scope="module")
def packed(records):
  batch = collate(records, 2, packed=True)
  where = {}  # sample index -> (row, segment id)
  for row in range(2):
    for seg in range(1, batch["segment_ids"][row].max() + 1):
      ids = batch["input_ids"][row][batch["segment_ids"][row] == seg]
      where[next(i for i, r in enumerate(records) if np.array_equal(r["ids"], ids))] = (row, seg)
  assert where == {0: (0, 1), 1: (0, 2), 2: (1, 1), 3: (1, 2)}
  return batch, where



def test_each_packed_sample_has_its_own_loss_and_gradients(gqa_loaded, records, packed):
  """Sample k's labels alone in the packed batch give the summed loss, label count and gradients
  (every trainable weight, encoder included) of sample k alone in a padded row."""
  batch, where = packed
  graphdef, params, frozen = train_step.split(gqa_loaded.module(), "all")
  grad_fn = jax.jit(jax.value_and_grad(train_step.summed_loss_fn, has_aux=True), static_argnums=3)
  for k, (row, seg) in where.items():
    mine = np.zeros_like(batch["labels"], bool)
    mine[row] = batch["segment_ids"][row] == seg
    (loss, count), grads = grad_fn(params, frozen, {**batch, "labels": np.where(mine, batch["labels"], IGNORE)},
                                   graphdef)
    (ref_loss, ref_count), ref_grads = grad_fn(params, frozen, collate(records[k:k + 1], 1, packed=False), graphdef)
    assert int(count) == int(ref_count) > 0
    assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss))
    ref_grads, grads = flat(ref_grads), flat(grads)
    biggest = max(float(jnp.abs(g).max()) for g in ref_grads.values())
    for path, ref in ref_grads.items():
      # k_proj biases get zero gradients up to rounding (softmax ignores a shift), compared on the whole scale.
      scale = biggest if "k_proj" in path and path[-1] == "bias" else float(jnp.abs(ref).max())
      err = float(jnp.abs(grads[path] - ref).max())
      assert err <= RTOL * scale, (k, path, err, scale)


def test_the_window_token_mean_is_that_of_the_samples_padded(gqa_loaded, records, packed):
  """One update from the packed batch (2 rows, accumulated as 2 micro-batches) and one from the same
  samples padded one a row (4 rows, 2 micro-batches of 2): the same token-mean loss over the window,
  label count, real tokens and gradient norm; the packed one in half the token slots."""
  metrics = {}
  for name, (batch, accum) in {"packed": (packed[0], 2), "padded": (collate(records, 4, packed=False), 2)}.items():
    graphdef, params, frozen = train_step.split(gqa_loaded.module(), "projector")  # the cheapest to compile
    tx = optimizer.make_optimizer(1e-3, 10, warmup_ratio=0.0, clip_norm=1.0)
    mesh = gqa_loaded.mesh
    state = train_step.init_state(params, tx, mesh)
    step_fn = train_step.jit_train_step(graphdef, tx, state, frozen, mesh, accum_steps=accum)
    micro = {k: v.reshape(sharding.micro_batched(v.shape, accum)) for k, v in batch.items()}
    with jax.set_mesh(mesh):
      _, metrics[name] = jax.device_get(step_fn(state, frozen, micro))
  packed_m, padded_m = metrics["packed"], metrics["padded"]
  assert int(packed_m["label_tokens"]) == int(padded_m["label_tokens"]) == sum((r["labels"][1:] != IGNORE).sum() for r in records)
  assert int(packed_m["real_tokens"]) == int(padded_m["real_tokens"]) == sum(len(r["ids"]) for r in records)
  assert int(packed_m["token_slots"]) == 2 * LENGTH and int(padded_m["token_slots"]) == 4 * LENGTH
  # Each sample attends causally within itself only, packed or not: n (n + 1) / 2 pairs for n tokens.
  pairs = sum(len(r["ids"]) * (len(r["ids"]) + 1) // 2 for r in records)
  assert int(packed_m["attention_pairs"]) == int(padded_m["attention_pairs"]) == pairs
  assert abs(packed_m["loss"] - padded_m["loss"]) <= RTOL * padded_m["loss"]
  assert abs(packed_m["grad_norm"] - padded_m["grad_norm"]) <= RTOL * padded_m["grad_norm"]
