"""Settings shared by every stage of the curriculum, and what each stage changes
(docs/upstream.md#optimiser-and-stages). `configs/stageN.py` is `stage(N)`. Any field can be
overridden on the command line: `--config.optim.lr=3e-5`, `--config.data.train=a.json,b.json`.
The model's shape is never configured: it comes from the checkpoint in `init_from`.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = ""  # anything from_pretrained reads, or the previous stage's workdir
  c.trainable = "projector"  # projector | encoder_projector | all | lora
  c.lora = ml_collections.ConfigDict({"rank": 64, "alpha": 16.0})  # upstream stage 3.5 (peft defaults)

  c.data = ml_collections.ConfigDict()
  c.data.train = ""  # comma-separated upstream JSON manifests
  c.data.style = ""  # prompt style; "": the one the checkpoint was trained with (AF3 nvidia, Music Flamingo hf)
  c.data.max_windows = 1  # 30 s windows per audio (upstream `audio_frames`): 1, 1, 5, 20, 20
  c.data.max_length = 8192  # tokens after audio expansion (upstream model_max_length)
  c.data.length_buckets = (512, 1024, 2048, 4096, 8192)  # padded lengths: few shapes, few compiles
  # Each row holds as many samples as fit in max_length tokens and max_windows windows (grain best-fit
  # packing), each attending only to itself, positions from 0, its first label ignored: NVIDIA packs
  # too (its rows are a micro-batch's samples). Chat and QA samples are short, so padding otherwise
  # takes most of a step. With one window a row (stages 1, 2) a row holds one sample with audio at most.
  # Packed, a step holds more samples than rows: epochs are counted from the samples of the first step
  # (an estimate), and which samples share a step depends on the number of hosts.
  c.data.packing = True
  c.data.workers = 2  # grain worker processes decoding audio; 0 decodes in the training process
  c.data.seed = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_ratio = 0.03  # then cosine decay to 0
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0  # global-norm clipping; 0 turns it off (stage 1 upstream)

  c.per_device_batch = 4
  c.accum_steps = 1
  c.epochs = 1
  c.total_steps = 0  # 0: epochs x steps per epoch
  c.save_every = 500
  c.keep_checkpoints = 3
  c.log_every = 1

  c.param_dtype = "float32"  # trainable weights; frozen ones are stored in compute_dtype
  c.compute_dtype = "bfloat16"
  c.remat = "nothing_saveable"  # none | nothing_saveable | dots_saveable
  c.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  c.seed = 0
  c.peak_tflops = 989.0  # per device, for the MFU estimate (H100 SXM dense bf16)
  return c


# Upstream's table (the paper's stage 3.5 is our stage 4, chat is stage 5): trainable set, 30 s windows
# per audio, learning rate, clipping (stage 1's DeepSpeed config has none), per-device batch x
# accumulation, epochs.
STAGES = {
    1: dict(trainable="projector", windows=1, lr=1e-3, clip_norm=0.0, batch=4, accum=1, epochs=1),
    2: dict(trainable="encoder_projector", windows=1, lr=1.5e-5, clip_norm=1.0, batch=4, accum=4, epochs=1),
    3: dict(trainable="all", windows=5, lr=1.5e-5, clip_norm=1.0, batch=2, accum=8, epochs=1),
    4: dict(trainable="lora", windows=20, lr=5e-5, clip_norm=1.0, batch=2, accum=8, epochs=2),
    5: dict(trainable="all", windows=20, lr=5e-5, clip_norm=1.0, batch=2, accum=8, epochs=2),
}


def stage(n: int) -> ml_collections.ConfigDict:
  if n not in STAGES:
    raise ValueError(f"stage {n}: the stages are {', '.join(map(str, STAGES))}")
  s = STAGES[n]
  c = base()
  c.trainable = s["trainable"]
  c.data.max_windows = s["windows"]
  c.optim.lr, c.optim.clip_norm = s["lr"], s["clip_norm"]
  c.per_device_batch, c.accum_steps, c.epochs = s["batch"], s["accum"], s["epochs"]
  return c
