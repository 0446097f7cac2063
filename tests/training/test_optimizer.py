"""The optimizer equals torch.optim and transformers' schedule: the warmup-cosine learning rate step by
step, and AdamW's updates with gradient clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import assert_close, flat

from af3_jax.training import optimizer, step as train_step

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_schedule_matches_hf():
  total, lr = 100, 2e-5
  schedule = optimizer.make_schedule(lr, total, warmup_ratio=0.03)  # warmup ceil(3.0) = 3
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.AdamW([p], lr=lr)
  hf = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=total)
  for step in range(total):
    assert abs(float(schedule(step)) - opt.param_groups[0]["lr"]) <= 1e-6 * lr, step
    opt.step()
    hf.step()


def test_adamw_updates_match_torch(gqa_loaded):
  """Three updates (lr 0 at step 0 in warmup, then peak, then cosine) with clipping at 1.0."""
  _, params, _ = train_step.split(gqa_loaded.module(), "projector")
  total, lr = 10, 1e-2
  tx = optimizer.make_optimizer(lr, total, warmup_ratio=0.1, clip_norm=1.0)
  rng = np.random.default_rng(0)
  draw = lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  grads = [jax.tree.map(draw, params) for _ in range(3)]
  flat_params = flat(params)
  tp = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in flat_params.items()}
  opt = torch.optim.AdamW(tp.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  hf = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=total)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, opt_state = update(g, opt_state, params)
    params = jax.tree.map(jnp.add, params, updates)
    for k, v in flat(g).items():
      tp[k].grad = torch.tensor(np.asarray(v))
    torch.nn.utils.clip_grad_norm_(tp.values(), 1.0)
    opt.step()
    hf.step()
  moved = 0.0
  for k, v in flat(params).items():
    assert_close(v, tp[k].detach().numpy())
    moved = max(moved, float(np.abs(np.asarray(v) - np.asarray(flat_params[k])).max()))
  assert moved > 1e-3
