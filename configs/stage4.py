"""Stage 4 (the paper's stage 3.5, think mode): LoRA r=64, alpha=16 on every decoder linear except the
head, encoder and projector frozen, up to 10 min of audio, lr 5e-5, 2 epochs."""

from configs import common


def get_config(arg=None):
  del arg
  return common.stage(4)
