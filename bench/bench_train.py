"""Training step speed of af3_jax against the same step in transformers' PyTorch AF3, on one device.

  python bench/bench_train.py --size tiny                    # seconds on a CPU
  python bench/bench_train.py --size full --decoder-layers 4 # one H100/H200: full encoder, truncated LLM
  (from the repo root, with af3_jax installed or PYTHONPATH=.)

For each stage's trainable set (projector, encoder_projector, all, lora), one optimizer step on a random
batch (rows of one 30 s window, its 750 `<sound>` tokens and a text prompt, every text token a label):
forward, backward and AdamW, bf16 compute with float32 trainable weights on our side, and on torch's a
bf16 model whose trainable parameters are float32 (the same split). Step time is the median of warm
steps; JAX's compile time is reported apart. Tokens/s counts real tokens (the bench pads nothing); MFU
is the model's FLOPs for the batch (`af3_jax.flops`: matmuls, causal attention pairs and the encoder's
windows, x3 for training) / time / --peak-tflops. Memory: XLA's plan for the compiled step (per device)
beside torch's peak allocation on CUDA. The full 8B model with AdamW does not fit one card, hence
`--decoder-layers`; `train.py --compile_only` plans the full model on a mesh.
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

from af3_jax import flops, lora, optim, train_run, train_step
from af3_jax.models.whisper import tokens_per_window
from af3_jax.pretrained import init_random
from presets import MODELS

_SIZE = flags.DEFINE_enum("size", "tiny", ["tiny", "full"], "The model (bench/presets.py).")
_DECODER_LAYERS = flags.DEFINE_integer("decoder-layers", None, "Truncate the LLM to this many layers.")
_BATCH = flags.DEFINE_integer("batch", 2, "Rows per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Warm steps timed per cell (after one compiling step).")
_STAGES = flags.DEFINE_multi_enum("stage", list(train_step.TRAINABLE), list(train_step.TRAINABLE), "Trainable sets.")
LORA = lora.Spec(rank=64, alpha=16.0)  # stage 3.5's
_PEAK = flags.DEFINE_float("peak-tflops", 989.0, "The device's dense bf16 peak, for MFU (H100 SXM: 989).")


@dataclasses.dataclass
class Row:
  stage: str
  params: int
  jax_s: float
  torch_s: float
  compile_s: float
  jax_gib: float | None
  torch_gib: float | None


def batch(cfg, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  text, audio, frames = 24, tokens_per_window(cfg.encoder), cfg.encoder.mel_frames
  ids = rng.integers(0, cfg.audio_token_id, (rows, audio + text)).astype(np.int32)
  ids[:, 8:8 + audio] = cfg.audio_token_id
  labels = np.where(ids == cfg.audio_token_id, train_step.IGNORE, ids)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
          "input_features": rng.standard_normal((rows, cfg.encoder.num_mel_bins, frames)).astype(np.float32),
          "input_features_mask": np.ones((rows, frames), np.int32)}


def time_jax(cfg, stage: str, host: dict) -> tuple[float, float, float | None, int]:
  """(median warm step s, compile s, planned peak GiB per device, trainable parameters)."""
  model = init_random(cfg, dtype=jnp.bfloat16)
  adapter = LORA if stage == "lora" else None
  graphdef, params, frozen = train_run.prepare(model, stage, adapter)
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
  plan = train_run.memory_plan(step)
  return statistics.median(times[1:]), compile_s, plan and plan["peak_gib"], train_run.count(params)


def time_torch(cfg, stage: str, host: dict, device: str) -> tuple[float, float | None]:
  """(median warm step s, peak GiB allocated on CUDA, None on a CPU)."""
  config = transformers.AudioFlamingo3Config(**cfg.to_hf_dict())
  with torch.device(device):
    model = transformers.AudioFlamingo3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
  if stage == "lora":
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA.rank, lora_alpha=LORA.alpha, target_modules=".*" + lora.TARGET))
  else:
    prefixes = {"projector": ("model.multi_modal_projector",),
                "encoder_projector": ("model.multi_modal_projector", "model.audio_tower"), "all": ("",)}[stage]
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
  host = batch(cfg, _BATCH.value, np.random.default_rng(0))
  rows, length = host["input_ids"].shape
  counts = {k: float(v) for k, v in flops.batch_counts(host).items()}
  tokens = counts["real_tokens"]
  step_flops = flops.train_flops(cfg, tokens=tokens, attention_pairs=counts["attention_pairs"],
                                 windows=counts["audio_windows"])
  results = []
  for stage in _STAGES.value:
    print(f"{stage}: torch ...", flush=True)
    torch_s, torch_gib = time_torch(cfg, stage, host, device)
    print(f"{stage}: jax ...", flush=True)
    jax_s, compile_s, jax_gib, trainable = time_jax(cfg, stage, host)
    results.append(Row(stage, trainable, jax_s, torch_s, compile_s, jax_gib, torch_gib))
  peak = _PEAK.value * 1e12
  gib = lambda x: "-" if x is None else f"{x:.2f}"
  print(f"\n{_SIZE.value} AF3 ({cfg.decoder.num_layers} decoder layers), batch {rows} x {length} tokens "
        f"({int((host['labels'] != train_step.IGNORE).sum())} labels), {step_flops / 1e12:.2f} TFLOP a step, bf16 | "
        f"JAX {jax.__version__} on {jax.devices()[0].platform} | torch {torch.__version__} on {device} | "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}\n")
  print("| stage | trainable | JAX step s | torch step s | JAX tokens/s | torch tokens/s | JAX MFU | torch MFU "
        "| JAX plan GiB | torch peak GiB | JAX compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r.stage} | {r.params:,} | {r.jax_s:.3f} | {r.torch_s:.3f} | {tokens / r.jax_s:.0f} | "
          f"{tokens / r.torch_s:.0f} | {step_flops / r.jax_s / peak:.1%} | {step_flops / r.torch_s / peak:.1%} | "
          f"{gib(r.jax_gib)} | {gib(r.torch_gib)} | {r.compile_s:.1f} |")


if __name__ == "__main__":
  app.run(main)
