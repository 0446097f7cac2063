"""The optimiser of every AF3 stage (docs/upstream.md#optimiser-and-stages): AdamW + warmup/cosine, optional clipping.

Upstream trains with HF `Trainer`: `adamw_torch` (betas 0.9/0.999, eps 1e-8, weight decay 0), the
`cosine` scheduler with `warmup_ratio` 0.03, and `max_grad_norm` 1.0 (stages 2-4; stage 1's DeepSpeed
config has no clipping).
"""

from __future__ import annotations

import math

import jax
import optax


def make_schedule(lr: float, total_steps: int, warmup_ratio: float = 0.03) -> optax.Schedule:
  """HF `get_cosine_schedule_with_warmup` (`transformers/optimization.py`), step for step.

  HF: warmup = ceil(ratio * total) (`TrainingArguments.get_warmup_steps`); the k-th optimizer step
  (k = 0, 1, ...) uses lr * k / warmup while k < warmup, then lr * 0.5 * (1 + cos(pi * (k - warmup) /
  (total - warmup))). `LambdaLR` sets lr(0) before the first step and `scheduler.step()` runs after each
  optimizer step, so the first update uses lr(0), which is 0 when there is a warmup: that update moves
  nothing (Adam's moments still take the gradient). optax evaluates the schedule at its update count,
  which is also 0 on the first update, so the two agree exactly (up to float32 rounding).
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  warmup = math.ceil(warmup_ratio * total_steps)
  # HF divides by max(1, total - warmup); optax needs a positive decay length.
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                            decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(lr: float, total_steps: int, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """(clip_by_global_norm(clip_norm) if clip_norm) + AdamW(0.9, 0.999, eps 1e-8) on `make_schedule`.

  Equals `torch.optim.AdamW` with `torch.nn.utils.clip_grad_norm_` (both use eps outside the square
  root and bias-correct both moments). `learning_rate(opt_state)` reads the rate of the latest update.
  """

  def build(learning_rate):
    adamw = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw

  return optax.inject_hyperparams(build)(learning_rate=make_schedule(lr, total_steps, warmup_ratio))


def learning_rate(opt_state: optax.OptState) -> jax.Array:
  """The learning rate the latest update of a `make_optimizer` optimizer used (its schedule at step k)."""
  return opt_state.hyperparams["learning_rate"]
