"""Stage 1: align the adaptor. Projector only, 30 s of audio, lr 1e-3, no clipping (upstream zero3.json)."""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base()
  c.trainable = "projector"
  c.data.max_windows = 1
  c.optim.lr = 1e-3
  c.optim.clip_norm = 0.0
  c.per_device_batch, c.accum_steps = 4, 1
  return c
