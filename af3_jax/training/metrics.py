"""Training metrics: one JSON object per logged step in `workdir/metrics.jsonl` and the same scalars as
TensorBoard events in the workdir (written by tensorboardX), with tokens/s, MFU and packing efficiency
added.

Every `every` steps one record sums up the steps since the last: the counts (`train_step`'s
`label_tokens` and `flops.batch_counts`) and `skipped` are summed, `lr` is the last step's, anything
else (loss, grad_norm) is the mean. `tokens_per_s` counts real tokens (padding excluded); `mfu` is the
model's FLOPs for those batches (`flops.train_flops`: matmuls, the causal attention pairs, the audio
windows, and a backward pass only where the stage's trainable set needs one) over the time since the
last record and the devices' peak. `packing_efficiency` is the share
of token slots that held real tokens, padding being the rest (`real_tokens / token_slots`). A
resumed run first drops the records after the step it resumes from, so `metrics.jsonl` holds each step
once; its event file starts with a purge marker at the next step, so TensorBoard hides the earlier
run's events from there on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tensorboardX

from af3_jax import files
from af3_jax.config import AF3Config
from af3_jax.training import flops

_SUMMED = ("label_tokens", "real_tokens", "token_slots", "attention_pairs", "audio_windows", "skipped")
_LAST = ("lr",)


class MetricsLog:
  """Appends metrics; tokens/s and MFU are measured between consecutive records."""

  def __init__(self, workdir: Path, *, model: AF3Config, peak_flops: float, every: int = 1, after_step: int = 0,
               trainable: str = "all", lora_rank: int = 0):
    self.path = workdir / "metrics.jsonl"
    self.every = every
    self.model = model
    self.trained = dict(trainable=trainable, lora_rank=lora_rank)  # what `flops.train_flops` counts a backward for
    self.peak_flops = peak_flops
    self.pending: list[dict] = []
    self._drop_records_after(after_step)
    # TensorBoard hides the earlier run's events from purge_step on (on a fresh start too: a run that crashed
    # before its first checkpoint). tensorboardX names the file by the second and host alone and truncates
    # it, so the suffix keeps a quick rerun from overwriting the earlier run's file. flush() in add writes
    # what the writer's thread has dequeued; flush_secs bounds how long the rest waits.
    self.events = tensorboardX.SummaryWriter(logdir=str(workdir), purge_step=after_step + 1, flush_secs=1,
                                             filename_suffix=f".{after_step}")
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
    seconds = max(now - self.last, 1e-9)
    self.last = now
    work = flops.train_flops(self.model, tokens=summary.get("real_tokens", 0.0),
                             attention_pairs=summary.get("attention_pairs", 0.0),
                             windows=summary.get("audio_windows", 0.0), **self.trained)
    record = {"step": step, **summary, "tokens_per_s": summary.get("real_tokens", 0.0) / seconds,
              "mfu": work / seconds / self.peak_flops}
    if summary.get("token_slots"):
      record["packing_efficiency"] = summary["real_tokens"] / summary["token_slots"]
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for tag, value in record.items():
      if tag != "step":
        self.events.add_scalar(tag, value, step)
    self.events.flush()  # a killed run keeps its events
    return record

  def close(self) -> None:
    """Writes the remaining events and stops the writer's thread."""
    self.events.close()

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _summarize(steps: list[dict]) -> dict:
  """One record for several steps' metrics (see the module docstring)."""
  summary = {}
  for k in steps[0]:
    values = [s[k] for s in steps]
    summary[k] = float(sum(values) if k in _SUMMED else values[-1] if k in _LAST else np.mean(values))
  return summary
