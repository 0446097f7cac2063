"""CPU smoke runs on a tiny checkpoint: everything trainable, float32, short buckets, no workers.

`--config=configs/tiny.py:STAGE` (1..5) keeps that stage's trainable set instead.
"""

from configs import common


def get_config(arg=None):
  c = common.base()
  if arg:
    stage = common.stage(int(arg))
    c.trainable, c.lora = stage.trainable, stage.lora
  else:
    c.trainable = "all"
  c.lora.rank = 4
  c.data.max_windows = 1
  c.data.max_length = 1024
  c.data.length_buckets = (256, 512, 1024)
  c.data.workers = 0
  c.optim.lr = 3e-3
  c.per_device_batch = 1
  c.total_steps = 20
  c.save_every = 10
  c.param_dtype = c.compute_dtype = "float32"
  c.remat = "none"
  return c
