"""A multi-process run's stop and counts, on 2 processes of one jax.distributed run on this machine:
SIGTERM or SIGINT to either process alone stops both after the same step (`preemption.Stop` over
JAX's preemption sync point), and per-host counts sum over the processes."""

import signal

import pytest
from helpers import ROOT
from helpers.processes import finish, start_processes


# A run resumed at step 5: it joins, loads for a while, then steps in lockstep as train steps do (a
# collective each), process 1 taking twice as long, so a signal finds the processes at different points.
_LOOP = """
import time
from af3_jax import distributed
assert distributed.initialize_distributed()
import jax
from jax.experimental import multihost_utils
from af3_jax.training.preemption import Stop

Stop.join(5)
print("joined", flush=True)
time.sleep(3)
Stop.install()
for step in range(6, 10_000):
  multihost_utils.sync_global_devices(f"step {step}")
  time.sleep(0.05 * (1 + jax.process_index()))
  print(step, flush=True)
  if Stop.after(step):
    print(f"stopped after step {step}")
    break
"""


@pytest.mark.parametrize("sig, target, when", [(signal.SIGTERM, 1, "6"), (signal.SIGINT, 0, "joined")])
def test_a_signal_to_one_process_stops_every_process_after_the_same_step(sig, target, when):
  """Sent once both processes print `when`: amid the steps, or before the first one (then both stop
  after that first step, 6, not at the step 1 the preemption service would count from by itself)."""
  procs = start_processes(["-c", _LOOP], ROOT)
  for p in procs:  # gloo writes to stdout too
    while (line := p.stdout.readline()) and line.strip() != when:
      pass
  procs[target].send_signal(sig)
  outs = finish(procs, timeout=120)  # unstopped, the loop would run for over 15 minutes
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  last = [out.strip().splitlines()[-1] for out, _ in outs]
  assert last[0].startswith("stopped after step ") and last[0] == last[1], last
  if when == "joined":
    assert last[0] == "stopped after step 6"


def test_all_hosts_gathers_every_process():
  """Under the train loop's transfer guard, as `skipped` is gathered and summed there each step."""
  code = """
import jax
from af3_jax import distributed
distributed.initialize_distributed()
with jax.transfer_guard("disallow"):
  print(int(distributed.all_hosts([3, 5][jax.process_index()]).sum()))
"""
  procs = start_processes(["-c", code], ROOT)
  outs = finish(procs, timeout=120)
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert [out.strip().splitlines()[-1] for out, _ in outs] == ["8", "8"]  # after gloo's own lines
