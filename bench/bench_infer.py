"""Inference speed of af3_jax against transformers' PyTorch AF3 or Music Flamingo, both with random weights,
on one device.

  python bench/bench_infer.py --size tiny     # a small model: seconds on a CPU
  python bench/bench_infer.py --size full     # AF3Config() (8.27B) in bf16: one H100 or H200
  python bench/bench_infer.py --size full --model-type musicflamingo --audio 30s --audio 20min
  (from the repo root, with af3_jax installed or PYTHONPATH=.)

Cells: 30 s (1 window), 10 min (20 windows) or 20 min (40 windows, Music Flamingo's longest) of audio per
row, at batch 1 and 8 (--batch; 10 min cells at --batch-10min's batches if given). Every row is a short
text prompt around 750 `<sound>` tokens per window (Music Flamingo: between its audio bos and eos); the
features are random log-mel shaped as the processor gives them, masks full. Both sides decode exactly
--new-tokens tokens greedily: a model with no checkpoint has no eos on our side, and transformers gets
min_new_tokens as well.

Time to first token (TTFT): from host inputs until the first new token is on the host (audio encoder
and prefill). Decode tokens/s: (N - 1) * batch / the time after the first token. JAX is timed on its
streaming path (`generate_stream`: one jitted step per token, the host sees each, as torch's streamer
does) and on `generate` (the whole loop in one jit; decode time = generate(N) - generate(1), one
program while N <= 64). JAX's first calls compile: they are reported apart from the warm medians. torch
runs first and returns its device memory before JAX starts, so neither limits the other. Random weights
make the answers meaningless; only the times count. `--projections=separate --projections=fused` times
JAX with the projections as loaded and fused (`Model.fused`) on the same weights, a row each;
`--quantize=none --quantize=int8` JAX's weights in --dtype and in int8, a row each again.

After the cells' table, issue 21's figures, transformers and each JAX variant side by side: decode
tokens/s at batch 1 and 8 (30 s, JAX's `generate` loop), time to first token for 30 s, prefill of
10 min (its time to first token), the programs JAX compiled and their seconds, and int8's decode speed
over the same projections in --dtype. A figure whose cell was not run is "-".
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX would take 75% of the GPU from torch

import dataclasses
import datetime
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from af3_jax import sharding
from af3_jax.checkpoints.pretrained import Model, init_random
from af3_jax.config import AF3Config, MODEL_TYPES
from af3_jax.hlo import compiles
from af3_jax.inference import decode
from af3_jax.models.whisper import tokens_per_window
from infer_tables import describe, figures, table
from presets import TokenClock, model_config, torch_model

_SIZE = flags.DEFINE_enum("size", "tiny", ["tiny", "full"], "A preset: the model and the defaults below.")
_MODEL_TYPE = flags.DEFINE_enum("model-type", "audioflamingo3", MODEL_TYPES, "The family, as config.json's "
                                "model_type: AF3, or Music Flamingo (rotary time embeddings on the encoder output).")
_DEVICE = flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "Where both run (auto: gpu if torch sees one).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype, both sides.")
_QUANTIZE = flags.DEFINE_multi_enum("quantize", ["none"], ["none", "int8"], "JAX's weights as from_pretrained's "
                                    "quantize (int8: the decoder's linears), a row each; torch keeps --dtype.")
_NEW = flags.DEFINE_integer("new-tokens", None, "Tokens each row decodes, at least 2 (default: the preset's).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Warm runs per cell, medians reported (default: the preset's).")
_AUDIO = flags.DEFINE_multi_enum("audio", None, ["30s", "10min", "20min"], "Audio lengths (default: the preset's).")
_BATCH = flags.DEFINE_multi_integer("batch", [1, 8], "Batch sizes.")
_BATCH_10MIN = flags.DEFINE_multi_integer("batch-10min", None, "Batch sizes of the 10 min cells (default: --batch).")
_PROJECTIONS = flags.DEFINE_multi_enum(
    "projections", ["separate"], ["separate", "fused"],
    "JAX's decoder projections: as loaded (q/k/v and gate/up apart) and/or `Model.fused` (one matmul each); "
    "both: the same weights timed each way, one row each.")

WINDOWS = {"30s": 1, "10min": 20, "20min": 40}  # 30 s windows per row
PROMPT = (4, 12)  # text tokens before and after the audio, as a chat template adds


@dataclasses.dataclass(frozen=True)
class Preset:
  audio: tuple[str, ...]
  new_tokens: int
  repeats: int


PRESETS = {  # the model is presets.MODELS[size], of --model-type's family
    # 10 min is left out at tiny size (--audio=10min runs it): on 2 CPU cores one such prefill takes
    # JAX ~25 s and torch ~8 s (bench_memory.py measures its memory).
    "tiny": Preset(audio=("30s",), new_tokens=32, repeats=1),
    "full": Preset(audio=("30s", "10min"), new_tokens=64, repeats=3),
}


@dataclasses.dataclass
class Timing:
  """One side of one cell, from the medians of the warm runs (JAX's compile: first calls minus warm
  ones, every program of the cell; compiles: the programs it compiled); all None when the device ran
  out of memory."""

  ttft: float | None = None
  tok_s: float | None = None
  loop_tok_s: float | None = None
  compile_s: float | None = None
  compiles: int | None = None


def make_batch(cfg: AF3Config, windows: int, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
  """transformers-named inputs: every row the same length, so nothing is padded."""
  rng = np.random.default_rng(seed)
  text = lambda n: rng.integers(0, cfg.audio_token_id, (rows, n))
  audio = np.full((rows, windows * tokens_per_window(cfg.encoder)), cfg.audio_token_id)
  if cfg.rote is not None:  # Music Flamingo's processor frames the audio
    audio = np.pad(audio, ((0, 0), (1, 0)), constant_values=cfg.audio_bos_token_id)
    audio = np.pad(audio, ((0, 0), (0, 1)), constant_values=cfg.audio_eos_token_id)
  ids = np.concatenate([text(PROMPT[0]), audio, text(PROMPT[1])], axis=1).astype(np.int32)
  frames = cfg.encoder.mel_frames
  return dict(input_ids=ids, attention_mask=np.ones_like(ids),
              input_features=rng.standard_normal((rows * windows, cfg.encoder.num_mel_bins, frames), np.float32),
              input_features_mask=np.ones((rows * windows, frames), np.int32))


def _median_split(runs: list[tuple[float, float]]) -> tuple[float, float]:
  return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _checked(tokens: np.ndarray, rows: int, n: int) -> None:
  if tokens.shape != (rows, n):
    raise RuntimeError(f"decoded {tokens.shape}, expected {(rows, n)} tokens: the timings would be wrong")


def jax_stream(model: Model, batch: dict, n: int) -> tuple[float, float]:
  """(TTFT, decode seconds after the first token) through `generate_stream`."""
  start = time.perf_counter()
  tokens, times = [], []
  for t in decode.generate_stream(model, batch, n):
    times.append(time.perf_counter())
    tokens.append(t)
  _checked(np.stack(tokens, axis=1), len(batch["input_ids"]), n)
  return times[0] - start, times[-1] - times[0]


def jax_loop(model: Model, batch: dict, n: int) -> float:
  """Seconds for `generate` (the whole loop in one jit), host inputs to host tokens."""
  start = time.perf_counter()
  tokens = decode.generate(model, batch, n)
  elapsed = time.perf_counter() - start
  _checked(tokens, len(batch["input_ids"]), n)
  return elapsed


def time_jax(model: Model, batch: dict, n: int, repeats: int) -> Timing:
  rows = len(batch["input_ids"])
  with compiles() as compiled:
    stream_first = sum(jax_stream(model, batch, n))
    ttft, dt = _median_split([jax_stream(model, batch, n) for _ in range(repeats)])
    loop_first = jax_loop(model, batch, n)
    first, full = _median_split([(jax_loop(model, batch, 1), jax_loop(model, batch, n)) for _ in range(repeats)])
  compile_s = (stream_first - ttft - dt) + (loop_first - full)
  # NaN: the prefill's jitter outweighed the decode (tiny models on a CPU); more tokens or repeats help.
  loop_tok_s = (n - 1) * rows / (full - first) if full > first else float("nan")
  return Timing(ttft, (n - 1) * rows / dt, loop_tok_s, compile_s, len(compiled))


def torch_run(model, batch: dict, n: int) -> tuple[float, float]:
  """(TTFT, decode seconds after the first token) of transformers' greedy generate, from host inputs."""
  device = model.device
  clock = TokenClock()
  if device.type == "cuda":
    torch.cuda.synchronize()
  start = time.perf_counter()
  inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
  inputs["input_ids"] = inputs["input_ids"].long()  # what transformers' processor gives
  inputs["input_features"] = inputs["input_features"].to(model.dtype)
  with torch.inference_mode():
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                         streamer=clock)
  _checked(out[:, batch["input_ids"].shape[1]:].cpu().numpy(), len(batch["input_ids"]), n)
  return clock.times[1] - start, clock.times[-1] - clock.times[1]


def time_torch(model, batch: dict, n: int, repeats: int) -> Timing:
  torch_run(model, batch, n)  # warm-up: kernel selection, allocator growth
  ttft, dt = _median_split([torch_run(model, batch, n) for _ in range(repeats)])
  return Timing(ttft, (n - 1) * len(batch["input_ids"]) / dt)


def _is_oom(e: Exception) -> bool:
  return isinstance(e, torch.OutOfMemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def run_cells(name: str, measure: Callable[[dict], Timing], cfg: AF3Config, audios, batches) -> dict:
  """{(audio, batch): Timing} over the grid (10 min: --batch-10min's batches); a cell that runs out of
  device memory is reported, not fatal."""
  results = {}
  for audio in audios:
    for rows in (_BATCH_10MIN.value or batches) if audio == "10min" else batches:
      batch = make_batch(cfg, WINDOWS[audio], rows)
      try:
        results[audio, rows] = t = measure(batch)
      except (RuntimeError, jax.errors.JaxRuntimeError) as e:
        if not _is_oom(e):
          raise
        results[audio, rows] = t = Timing()
      print(f"{name} {audio} batch {rows} ({batch['input_ids'].shape[1]} prompt tokens): {describe(t)}", flush=True)
  return results


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  preset = PRESETS[_SIZE.value]
  cfg = model_config(_SIZE.value, _MODEL_TYPE.value)
  n = _NEW.value or preset.new_tokens
  repeats = _REPEATS.value or preset.repeats
  audios = _AUDIO.value or preset.audio
  if n < 2 or repeats < 1 or min(_BATCH.value + (_BATCH_10MIN.value or [])) < 1:
    print("--new-tokens must be at least 2, --repeats and --batch at least 1", file=sys.stderr)
    return 1
  platform = _DEVICE.value if _DEVICE.value != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
  torch_device = "cuda" if platform == "gpu" else "cpu"
  jax_device = jax.devices(platform)[0]
  family = "Music Flamingo" if cfg.rote is not None else "AF3"
  header = (f"{_SIZE.value} {family}, {_DTYPE.value}, JAX quantize {'/'.join(_QUANTIZE.value)}, {n} new tokens, "
            f"{repeats} warm runs | "
            f"JAX {jax.__version__} on {jax_device.device_kind} | torch {torch.__version__} (transformers {transformers.__version__}) on "
            f"{torch.cuda.get_device_name() if torch_device == 'cuda' else 'cpu'} | "
            f"{datetime.datetime.now().isoformat(timespec='minutes')}")
  print(header, flush=True)

  model = torch_model(cfg, getattr(torch, _DTYPE.value), torch_device)
  print(f"torch model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
  torch_t = run_cells("torch", lambda b: time_torch(model, b, n, repeats), cfg, audios, _BATCH.value)
  del model
  if torch_device == "cuda":
    torch.cuda.empty_cache()

  jax_t, variants = {}, {}
  for quantize in dict.fromkeys(_QUANTIZE.value):
    start = time.perf_counter()
    jmodel = init_random(cfg, dtype=jnp.dtype(_DTYPE.value), mesh=sharding.single_device_mesh(jax_device),
                         quantize=quantize)
    jax.block_until_ready(jmodel.state)
    params = sum(x.size for x in jax.tree.leaves(jmodel.state))
    print(f"JAX model, quantize {quantize}: {params:,} parameters, random init {time.perf_counter() - start:.1f} s",
          flush=True)
    for projections in dict.fromkeys(_PROJECTIONS.value):
      label = f"{_DTYPE.value if quantize == 'none' else quantize} {projections}"
      variants[label] = quantize, projections
      model = jmodel if projections == "separate" else jmodel.fused()
      jax_t[label] = run_cells(f"JAX {label}", lambda b: time_jax(model, b, n, repeats), cfg, audios,
                               _BATCH.value)
      del model  # the fused copy's weights, before the next
    del jmodel

  print(f"\n{header}\n{table(jax_t, torch_t)}\n\n{figures(jax_t, torch_t, variants)}")
  return 0


if __name__ == "__main__":
  app.run(main)
