"""Training metrics: one JSON object per logged step in `workdir/metrics.jsonl` and the same scalars as
TensorBoard events in the workdir, with tokens/s and MFU added.

Every `every` steps one record sums up the steps since the last: `tokens` and `skipped` are summed,
`lr` is the last step's, anything else (loss, grad_norm) is the mean. A resumed run first drops the
records after the step it resumes from, so `metrics.jsonl` holds each step once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from af3_jax import files
from af3_jax.tensorboard import EventWriter

_SUMMED = ("tokens", "skipped")
_LAST = ("lr",)


def train_flops_per_token(n_params: int) -> float:
  """~6 N: forward (2 N) and backward (4 N) matmul flops per token, the usual dense estimate."""
  return 6.0 * n_params


class MetricsLog:
  """Appends metrics; tokens/s and MFU are measured between consecutive records."""

  def __init__(self, workdir: Path, *, n_params: int, peak_flops: float, every: int = 1, after_step: int = 0):
    self.path = workdir / "metrics.jsonl"
    self.every = every
    self.flops_per_token = train_flops_per_token(n_params)
    self.peak_flops = peak_flops
    self.pending: list[dict] = []
    self._drop_records_after(after_step)
    self.events = EventWriter(workdir)
    self.last = time.perf_counter()

  def _drop_records_after(self, step: int) -> None:
    """Keeps the records up to `step` (and drops a line cut short by a crash), rewritten atomically."""
    if not self.path.is_file():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record["step"] <= step:
        kept.append(line + "\n")
    files.write_text_atomic(self.path, "".join(kept))

  def add(self, step: int, metrics: dict, *, flush: bool = False) -> dict | None:
    """Takes one step's scalar metrics; every `every` steps, or when `flush`, writes the record of the
    steps taken since the last one (tokens_per_s and mfu added) and returns it."""
    self.pending.append({k: float(v) for k, v in metrics.items()})
    if not (flush or step % self.every == 0):
      return None
    summary = _summarize(self.pending)
    self.pending = []
    now = time.perf_counter()
    rate = summary.get("tokens", 0.0) / max(now - self.last, 1e-9)
    self.last = now
    record = {"step": step, **summary, "tokens_per_s": rate, "mfu": rate * self.flops_per_token / self.peak_flops}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self.events.scalars(step, {k: v for k, v in record.items() if k != "step"})
    return record


def _summarize(steps: list[dict]) -> dict:
  """One record for several steps' metrics (see the module docstring)."""
  summary = {}
  for k in steps[0]:
    values = [s[k] for s in steps]
    summary[k] = float(sum(values) if k in _SUMMED else values[-1] if k in _LAST else np.mean(values))
  return summary
