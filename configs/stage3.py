"""Stage 3: everything (encoder, projector, LLM), up to 2.5 min of audio, lr 1.5e-5."""

from configs import common


def get_config(arg=None):
  del arg
  return common.stage(3)
