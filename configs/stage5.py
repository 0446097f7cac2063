"""Stage 5 (AF3-Chat): everything, multi-turn multi-audio chat data, up to 10 min of audio, lr 5e-5,
2 epochs."""

from configs import common


def get_config(arg=None):
  del arg
  return common.stage(5)
