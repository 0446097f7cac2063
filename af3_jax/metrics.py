"""Training metrics: one JSON object per logged step in `workdir/metrics.jsonl` and the same scalars as
TensorBoard events in the workdir, with tokens/s and MFU added."""

from __future__ import annotations

import json
import time
from pathlib import Path

from af3_jax.tensorboard import EventWriter


def train_flops_per_token(n_params: int) -> float:
  """~6 N: forward (2 N) and backward (4 N) matmul flops per token, the usual dense estimate."""
  return 6.0 * n_params


class MetricsLog:
  """Appends metrics; tokens/s and MFU are measured between consecutive `write` calls."""

  def __init__(self, workdir: Path, *, n_params: int, peak_flops: float):
    self.path = workdir / "metrics.jsonl"
    self.events = EventWriter(workdir)
    self.flops_per_token = train_flops_per_token(n_params)
    self.peak_flops = peak_flops
    self.last = time.perf_counter()

  def write(self, step: int, metrics: dict, tokens: int) -> dict:
    """Adds tokens_per_s and mfu to `metrics` (host floats), appends them with `step`, returns them."""
    now = time.perf_counter()
    rate = tokens / max(now - self.last, 1e-9)
    self.last = now
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "tokens_per_s": rate,
              "mfu": rate * self.flops_per_token / self.peak_flops}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self.events.scalars(step, {k: v for k, v in record.items() if k != "step"})
    return record
