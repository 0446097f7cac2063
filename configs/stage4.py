"""Stage 4 (the paper's stage 3.5, think mode): LoRA r=64, alpha=16 on every decoder linear except the
head, encoder and projector frozen, up to 10 min of audio, lr 5e-5, 2 epochs."""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base()
  c.trainable = "lora"
  c.lora.rank, c.lora.alpha = 64, 16.0
  c.data.max_windows = 20
  c.optim.lr = 5e-5
  c.epochs = 2
  c.per_device_batch, c.accum_steps = 2, 8
  return c
