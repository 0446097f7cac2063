"""Stage 3: everything (encoder, projector, LLM), up to 2.5 min of audio, lr 1.5e-5."""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base()
  c.trainable = "all"
  c.data.max_windows = 5
  c.optim.lr = 1.5e-5
  c.per_device_batch, c.accum_steps = 2, 8
  return c
