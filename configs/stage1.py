"""Stage 1: align the adaptor. Projector only, 30 s of audio, lr 1e-3, no clipping."""

from configs import common


def get_config(arg=None):
  del arg
  return common.stage(1)
