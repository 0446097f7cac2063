"""Stage 2: encoder + projector, 30 s of audio, lr 1.5e-5, clipping at 1.0."""

from configs import common


def get_config(arg=None):
  del arg
  return common.stage(2)
