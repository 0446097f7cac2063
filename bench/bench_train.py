"""Training step speed of af3_jax against the same step in transformers' PyTorch AF3, on one device.

  PYTHONPATH=. python bench/bench_train.py --size tiny                      # seconds on a CPU
  PYTHONPATH=. python bench/bench_train.py --size full --decoder-layers 4   # one H100/H200: truncated LLM
  (from the repo root: it reads configs/)

For each stage's trainable set (projector, encoder_projector, all, lora), one optimizer step on a random
micro-batch shaped as that stage's config feeds one device (`STAGE_OF`): `per_device_batch` rows, each
holding as many 30 s windows as its `max_windows` and `max_length` allow (stages 1-2: 4 rows of one
window, 774 tokens; the "all" cell takes stage 5's: 2 rows of 10 windows, 7,524 tokens; LoRA stage 4's,
the same), each window's 750 `<sound>` tokens after a text prompt, every text token a label; `--batch`
overrides the rows. That is what a real run computes per device between two gradient reductions
(accumulation only adds micro-batches), and small batches understate what a GPU does: the H200 ran
4 rows of 774 tokens at a third of its peak. The stage's remat policy applies on both sides (jax's
checkpoint policy; transformers' activation checkpointing per layer when it is not "none"): without
it, 8 rows of 774 tokens with every weight trainable ran out of an H200's memory.

Forward, backward and AdamW, bf16 compute with float32 trainable weights on our side, and on torch's a
bf16 model whose trainable parameters are float32 (the same split). Step time is the median of warm
steps; JAX's compile time is reported apart. Tokens/s counts real tokens (the bench pads nothing); MFU
is the model's FLOPs for the micro-batch and the stage (`af3_jax.training.flops.train_flops`: the forward pass,
and a backward only through what follows the first trained weight, with weight gradients for the
trained ones; not what remat recomputes) / time / --peak-tflops. Memory: XLA's plan for the compiled
step (per device) beside torch's peak allocation on CUDA. The full 8B model with AdamW does not fit one
card, hence `--decoder-layers`; `train.py --compile_only` plans the full model on a mesh.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave torch its share of the GPU

import dataclasses
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from af3_jax import memory
from af3_jax.checkpoints import lora
from af3_jax.checkpoints.pretrained import init_random
from af3_jax.data import processor
from af3_jax.models.whisper import tokens_per_window
from af3_jax.training import flops, optimizer as optim, setup, step as train_step
from configs import common
from presets import MODELS

_SIZE = flags.DEFINE_enum("size", "tiny", ["tiny", "full"], "The model (bench/presets.py).")
_DECODER_LAYERS = flags.DEFINE_integer("decoder-layers", None, "Truncate the LLM to this many layers.")
_BATCH = flags.DEFINE_integer("batch", None, "Rows per step (default: the stage's per_device_batch).")
_STEPS = flags.DEFINE_integer("steps", 3, "Warm steps timed per cell (after one compiling step).")
_STAGES = flags.DEFINE_multi_enum("stage", list(train_step.TRAINABLE), list(train_step.TRAINABLE), "Trainable sets.")
_PEAK = flags.DEFINE_float("peak-tflops", 989.0, "The device's dense bf16 peak, for MFU (H100 SXM: 989).")

# The curriculum stage whose config shapes each trainable set's micro-batch: "all" trains in stages 3
# and 5, whose rows are the longest (10 minutes of audio).
STAGE_OF = {"projector": 1, "encoder_projector": 2, "all": 5, "lora": 4}
TEXT = (8, 16)  # text tokens before and after a row's audio


@dataclasses.dataclass
class Row:
  stage: str
  params: int
  shape: str
  tokens: int
  flops: float
  jax_s: float
  torch_s: float
  compile_s: float
  jax_gib: float | None
  torch_gib: float | None


@dataclasses.dataclass(frozen=True)
class Cell:
  """One trainable set, with what its stage's config sets: rows and windows of its micro-batch, remat, LoRA."""

  stage: str
  rows: int
  windows: int
  remat: str
  adapter: lora.Spec | None

  @classmethod
  def of(cls, stage: str, cfg, rows: int | None) -> Cell:
    c = common.stage(STAGE_OF[stage])
    fit = (c.data.max_length - sum(TEXT)) // tokens_per_window(cfg.encoder)
    return cls(stage, rows or c.per_device_batch, min(c.data.max_windows, fit), c.remat,
               lora.Spec(c.lora.rank, c.lora.alpha) if stage == "lora" else None)


def batch(cfg, cell: Cell, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """`cell.rows` rows: text, `cell.windows` windows of `<sound>` tokens, text; every text token a label."""
  audio, frames = cell.windows * tokens_per_window(cfg.encoder), cfg.encoder.mel_frames
  ids = rng.integers(0, cfg.audio_token_id, (cell.rows, TEXT[0] + audio + TEXT[1])).astype(np.int32)
  ids[:, TEXT[0]:TEXT[0] + audio] = cfg.audio_token_id
  labels = np.where(ids == cfg.audio_token_id, processor.IGNORE, ids)
  windows = cell.rows * cell.windows
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
          "input_features": rng.standard_normal((windows, cfg.encoder.num_mel_bins, frames)).astype(np.float32),
          "input_features_mask": np.ones((windows, frames), np.int32)}


def time_jax(cfg, cell: Cell, host: dict) -> tuple[float, float, float | None, int]:
  """(median warm step s, compile s, planned peak GiB per device, trainable parameters)."""
  model = init_random(cfg, dtype=jnp.bfloat16, remat=cell.remat)
  graphdef, params, frozen = train_step.prepare(model, cell.stage, cell.adapter)
  optimizer = optim.make_optimizer(1e-5, 1000, clip_norm=1.0)
  with jax.set_mesh(model.mesh):
    state = train_step.init_state(params, optimizer, model.mesh)
    data = jax.device_put(host)
    start = time.perf_counter()
    step = train_step.jit_train_step(graphdef, optimizer, state, frozen, model.mesh).lower(state, frozen, data).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(_STEPS.value + 1):  # the first call still pays for allocation and transfers
      start = time.perf_counter()
      state, m = step(state, frozen, data)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
  plan = memory.memory_plan(step)
  return statistics.median(times[1:]), compile_s, plan and plan["peak_gib"], setup.count(params)


def time_torch(cfg, cell: Cell, host: dict, device: str) -> tuple[float, float | None]:
  """(median warm step s, peak GiB allocated on CUDA, None on a CPU)."""
  config = transformers.AudioFlamingo3Config(**cfg.to_hf_dict())
  with torch.device(device):
    model = transformers.AudioFlamingo3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
  model.train()  # activation checkpointing applies in training mode only (AF3's dropout rates are 0)
  if cell.remat != "none":
    model.activation_checkpointing_enable()  # per layer, recomputed in the backward pass, as our policy
  if cell.adapter:
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(
        r=cell.adapter.rank, lora_alpha=cell.adapter.alpha, target_modules=".*" + lora.TARGET))
  else:
    prefixes = {"projector": ("model.multi_modal_projector",),
                "encoder_projector": ("model.multi_modal_projector", "model.audio_tower"), "all": ("",)}[cell.stage]
    for name, p in model.named_parameters():
      p.requires_grad = name.startswith(prefixes) and "embed_positions" not in name
  trainable = [p for p in model.parameters() if p.requires_grad]
  for p in trainable:
    p.data = p.data.float()  # float32 master weights, as ours; autocast keeps the matmuls in bf16
  opt = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  inputs = {k: torch.tensor(v, device=device) for k, v in host.items()}
  inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
  inputs["labels"] = inputs["labels"].long()  # torch's cross-entropy takes int64 targets
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(_STEPS.value + 1):
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
  del model, opt
  if device == "cuda":
    torch.cuda.empty_cache()
  return statistics.median(times[1:]), peak


def main(argv: list[str]) -> None:
  del argv
  cfg = MODELS[_SIZE.value]
  if _DECODER_LAYERS.value:
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, num_layers=_DECODER_LAYERS.value))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  results = []
  for stage in _STAGES.value:
    cell = Cell.of(stage, cfg, _BATCH.value)
    host = batch(cfg, cell, np.random.default_rng(0))
    counts = {k: float(v) for k, v in flops.batch_counts(host).items()}
    work = flops.train_flops(cfg, tokens=counts["real_tokens"], attention_pairs=counts["attention_pairs"],
                             windows=counts["audio_windows"], trainable=stage,
                             lora_rank=cell.adapter.rank if cell.adapter else 0)
    print(f"{stage}: {cell.rows} x {host['input_ids'].shape[1]} tokens, {cell.windows} window(s) a row, remat "
          f"{cell.remat}: torch ...", flush=True)
    torch_s, torch_gib = time_torch(cfg, cell, host, device)
    print(f"{stage}: jax ...", flush=True)
    jax_s, compile_s, jax_gib, trainable = time_jax(cfg, cell, host)
    results.append(Row(stage, trainable, f"{cell.rows} x {host['input_ids'].shape[1]}", int(counts["real_tokens"]),
                       work, jax_s, torch_s, compile_s, jax_gib, torch_gib))
  peak = _PEAK.value * 1e12
  gib = lambda x: "-" if x is None else f"{x:.2f}"
  print(f"\n{_SIZE.value} AF3 ({cfg.decoder.num_layers} decoder layers), bf16, each stage's micro-batch and remat | "
        f"JAX {jax.__version__} on {jax.devices()[0].platform} | torch {torch.__version__} on {device} | "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}\n")
  print("| stage | trainable | rows x tokens | TFLOP a step | JAX step s | torch step s | JAX tokens/s | torch tokens/s "
        "| JAX MFU | torch MFU | JAX plan GiB | torch peak GiB | JAX compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r.stage} | {r.params:,} | {r.shape} | {r.flops / 1e12:.2f} | {r.jax_s:.3f} | {r.torch_s:.3f} | "
          f"{r.tokens / r.jax_s:.0f} | {r.tokens / r.torch_s:.0f} | {r.flops / r.jax_s / peak:.1%} | "
          f"{r.flops / r.torch_s / peak:.1%} | {gib(r.jax_gib)} | {gib(r.torch_gib)} | {r.compile_s:.1f} |")


if __name__ == "__main__":
  app.run(main)
