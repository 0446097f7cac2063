"""Stage 5 (AF3-Chat): everything, multi-turn multi-audio chat data, up to 10 min of audio, lr 5e-5,
2 epochs."""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base()
  c.trainable = "all"
  c.data.max_windows = 20
  c.optim.lr = 5e-5
  c.epochs = 2
  c.per_device_batch, c.accum_steps = 2, 8
  return c
