"""Multi-process runs: joining one, and what every process of it does together (a barrier, values
gathered from every host)."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize_distributed() -> bool:
  """Joins a multi-process run described by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (set them in every process), and says whether it did (not for a single process).
  Must run first."""
  n = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  if n > 1:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need it to talk
    # On by default: its notifier takes SIGTERM in any process to every process (train.py's stop).
    jax.config.update("jax_enable_preemption_service", True)
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  return n > 1


def all_hosts(*values: int) -> np.ndarray:
  """Every process's `values` (per-host counts and sizes), one row per process: one collective for
  all of them, so a step pays one host sync however many it gathers."""
  mine = np.asarray([values], np.int32)
  if jax.process_count() == 1:
    return mine
  return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(values))


def sync_processes(name: str) -> None:
  """A barrier of every process of a multi-process run; nothing for one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
