"""A multi-process run's stop and counts, on 2 processes of one jax.distributed run on this machine:
SIGTERM or SIGINT to either process alone stops both after the same step (train.py's `_Stop` over
JAX's preemption sync point), and per-host counts sum over the processes."""

import signal
from pathlib import Path

import pytest
from conftest import finish, start_processes

ROOT = Path(__file__).resolve().parents[1]

# Steps in lockstep, as train steps are (a collective each); process 1 takes twice as long, so the
# signal finds the processes at different points of a step.
_LOOP = """
import sys, time
from af3_jax import train_run
train_run.initialize_distributed()
import jax
from jax.experimental import multihost_utils
import train

train._Stop.install()
train._Stop.after(0)
for step in range(1, 10_000):
  multihost_utils.sync_global_devices(f"step {step}")
  time.sleep(0.05 * (1 + jax.process_index()))
  print(step, flush=True)
  if train._Stop.after(step):
    print(f"stopped after step {step}")
    break
"""


@pytest.mark.parametrize("sig, target", [(signal.SIGTERM, 1), (signal.SIGINT, 0)])
def test_a_signal_to_one_process_stops_every_process_after_the_same_step(sig, target):
  procs = start_processes(["-c", _LOOP], ROOT)
  for p in procs:  # both are stepping (gloo writes to stdout too)
    while (line := p.stdout.readline()) and line.strip() != "1":
      pass
  procs[target].send_signal(sig)
  outs = finish(procs, timeout=120)  # unstopped, the loop would run for over 15 minutes
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  last = [out.strip().splitlines()[-1] for out, _ in outs]
  assert last[0].startswith("stopped after step ") and last[0] == last[1], last


def test_all_hosts_sum_adds_every_process():
  """Under the train loop's transfer guard, as `skipped` is summed there each step."""
  code = """
import jax
from af3_jax import train_run
train_run.initialize_distributed()
with jax.transfer_guard("disallow"):
  print(train_run.all_hosts_sum([3, 5][jax.process_index()]))
"""
  procs = start_processes(["-c", code], ROOT)
  outs = finish(procs, timeout=120)
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert [out.strip().splitlines()[-1] for out, _ in outs] == ["8", "8"]  # after gloo's own lines
