"""Stopping a training run cleanly on a signal, every process at the same step (train.py's loop asks
after each step whether to save and stop)."""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class Stop:
  """SIGTERM or SIGINT to any process of the run: every process saves the same step and exits 0.

  One process: from its first step, a handler notes the signal and the loop stops after the current
  step. Several: from `join`, the preemption notifier that `jax.distributed.initialize` starts owns
  SIGTERM (a Python handler would replace its own, and the notice would stay in this process); it
  tells every process, and JAX's preemption sync point is then reached at the same step in all of
  them, the first step that each can still reach, wherever each one was when the signal came.
  """

  requested = False

  @classmethod
  def join(cls, start: int) -> None:
    """Right after `jax.distributed.initialize`: SIGINT is handed on to the notifier as SIGTERM, and
    the preemption service learns the step training resumes from (it counts the steps passed to
    `after` from 0, so a notice while the model loads would name step 1, which a resumed run never
    passes)."""
    signal.signal(signal.SIGINT, lambda *_: signal.raise_signal(signal.SIGTERM))
    cls.after(start)

  @classmethod
  def install(cls) -> None:
    """Before the first step of a single-process run (a multi-process run has joined)."""
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(cls, "requested", True))

  @classmethod
  def after(cls, step: int) -> bool:
    """Whether to save `step` and stop. Every process calls it once per step, in order: the
    preemption service picks the step from the last ones each process passed here."""
    return multihost_utils.reached_preemption_sync_point(step) or cls.requested  # the call first: never skipped
