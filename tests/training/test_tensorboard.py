"""MetricsLog's TensorBoard events, read back with tensorboardX's own protobufs: the same scalars as
metrics.jsonl, on disk before the writer closes, and a resumed run's purge marker; its packing
efficiency."""

import json
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from helpers.events import read_events, read_scalars

from af3_jax.config import AF3Config
from af3_jax.training import flops
from af3_jax.training.metrics import MetricsLog


def markers(path):
  """(step, file_version or session_log status) of the events that hold no summary."""
  return [(e.step, e.file_version or e.session_log.status) for e in read_events(path) if not e.HasField("summary")]


def log_steps(workdir, steps, *, after_step=0, every=1, scale=1.0):
  log = MetricsLog(workdir, model=AF3Config(), peak_flops=1e12, every=every, after_step=after_step)
  for step in steps:
    log.add(step, {"loss": scale / step, "grad_norm": 0.1 * step, "lr": 1e-3 * step, "label_tokens": 100 + step,
                   "skipped": step % 2}, flush=step == steps[-1])
  return log


def expected_scalars(workdir):
  """The records in metrics.jsonl as (step, tag, value), the values rounded to the float32 events hold."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], k, float(np.float32(v))) for r in records for k, v in r.items() if k != "step"]


def test_scalars_are_the_metrics_jsonl_records(tmp_path):
  log_steps(tmp_path, [1, 2, 3, 4, 5], every=2).close()
  (path,) = tmp_path.glob("events.out.tfevents.*")
  assert [s for s, *_ in read_scalars(path)] == [2] * 7 + [4] * 7 + [5] * 7  # loss .. mfu, per record
  assert read_scalars(path) == expected_scalars(tmp_path)
  # A fresh run purges from step 1: the events of an earlier attempt that saved no checkpoint.
  assert markers(path) == [(0, "brain.Event:2"), (1, "brain.Event:2"), (1, event_pb2.SessionLog.START)]


def test_events_reach_the_file_before_close(tmp_path):
  log = log_steps(tmp_path, [1, 2, 3])
  (path,) = tmp_path.glob("events.out.tfevents.*")
  deadline = time.time() + 10
  while time.time() < deadline and len(read_scalars(path)) < 21:
    time.sleep(0.05)
  assert read_scalars(path) == expected_scalars(tmp_path)  # what a killed run would leave
  log.close()


def test_a_resumed_run_purges_the_steps_it_replays(tmp_path):
  log_steps(tmp_path, [1, 2, 3, 4]).close()
  (first,) = tmp_path.glob("events.out.tfevents.*")
  log_steps(tmp_path, [3, 4], after_step=2, scale=2.0).close()  # resumed from a checkpoint at step 2
  (second,) = set(tmp_path.glob("events.out.tfevents.*")) - {first}
  assert [s for s, *_ in read_scalars(first)] == [1] * 7 + [2] * 7 + [3] * 7 + [4] * 7  # still all there
  assert markers(second) == [(0, "brain.Event:2"), (3, "brain.Event:2"), (3, event_pb2.SessionLog.START)]
  # On a SessionLog START TensorBoard drops the events already read at or past its step (tensorboard's
  # event_accumulator `_CheckForRestartAndMaybePurge`), which leaves each step of metrics.jsonl once.
  shown = [s for s in read_scalars(first) if s[0] < 3] + read_scalars(second)
  assert shown == expected_scalars(tmp_path)


def test_packing_efficiency_is_real_tokens_over_token_slots(tmp_path):
  """Over a record's steps: their real tokens over their slots, not the mean of each step's share."""
  with MetricsLog(tmp_path, model=AF3Config(), peak_flops=1e12, every=2) as log:
    log.add(1, {"loss": 1.0, "label_tokens": 10, "real_tokens": 100, "token_slots": 1000})
    record = log.add(2, {"loss": 1.0, "label_tokens": 10, "real_tokens": 900, "token_slots": 3000})
  assert (record["real_tokens"], record["token_slots"], record["packing_efficiency"]) == (1000, 4000, 0.25)


@pytest.mark.parametrize("trainable, rank", [("all", 0), ("lora", 64)])
def test_mfu_counts_the_models_flops_for_the_real_tokens(tmp_path, trainable, rank):
  """tokens/s counts real tokens, and MFU over tokens/s is the FLOPs per real token of those batches
  (attention pairs and audio windows included, the backward the stage's trainable set needs) over the
  peak, whatever the time between records."""
  counts = {"real_tokens": 3000, "token_slots": 8192, "attention_pairs": 2.0e6, "audio_windows": 4}
  with MetricsLog(tmp_path, model=AF3Config(), peak_flops=1e15, every=2, trainable=trainable, lora_rank=rank) as log:
    log.add(1, {"loss": 1.0, **counts})
    time.sleep(0.01)
    record = log.add(2, {"loss": 1.0, **counts})
  work = flops.train_flops(AF3Config(), tokens=6000, attention_pairs=4.0e6, windows=8, trainable=trainable,
                           lora_rank=rank)
  per_token = work / 6000 / 1e15
  assert abs(record["mfu"] / record["tokens_per_s"] - per_token) <= 1e-9 * per_token
