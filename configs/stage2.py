"""Stage 2: encoder + projector, 30 s of audio, lr 1.5e-5, clipping at 1.0."""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base()
  c.trainable = "encoder_projector"
  c.data.max_windows = 1
  c.optim.lr = 1.5e-5
  c.per_device_batch, c.accum_steps = 4, 4
  return c
