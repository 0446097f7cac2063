"""Several processes of one jax.distributed run on this machine, and waiting for them without hanging."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def start_processes(args: list[str], cwd: Path, n: int = 2) -> list[subprocess.Popen]:
  """`python *args` as the `n` processes of one jax.distributed run on this machine, one CPU device
  each (the variables `distributed.initialize_distributed` reads), with stdout and stderr piped."""
  portpicker = pytest.importorskip("portpicker")
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": str(n),
         "JAX_COORDINATOR_ADDRESS": f"localhost:{portpicker.pick_unused_port()}"}
  return [subprocess.Popen([sys.executable, *args], cwd=cwd, env={**env, "JAX_PROCESS_ID": str(i)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
  """Each process's (stdout, stderr) once all have ended; any still running after `timeout` seconds
  is killed and raises, so a hang fails the test instead of blocking the suite."""
  deadline = time.time() + timeout
  try:
    return [p.communicate(timeout=max(deadline - time.time(), 1)) for p in procs]
  finally:
    for p in procs:
      p.kill()
