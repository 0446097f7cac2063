"""Host memory of long-audio generation: peak RSS of one `af3_jax.generate` call per audio length.

  python bench/bench_memory.py                       # the tiny test model, 5 and 10 minutes of audio
  python bench/bench_memory.py --size full --aot     # compiled memory only, at the released AF3 size
  python bench/bench_memory.py --size full --aot --dtype bfloat16 --quantize int8 --minutes 0.5
  python bench/bench_memory.py --size full --dtype bfloat16 --quantize int8 --minutes 10 --target v5e-1
  python bench/bench_memory.py --model-type musicflamingo --minutes 5 --minutes 10 --minutes 20
  (from the repo root, with af3_jax installed or PYTHONPATH=.)

Each length runs in a fresh process: random weights (no checkpoint), an NVIDIA-style prompt (`<sound>`
and a newline per 30 s window, 750 audio frames each: 5 minutes is 7,500 audio tokens, 10 minutes
15,000; Music Flamingo: one run of them between its audio bos and eos, up to 20 minutes, 30,000), then
a few greedy tokens. Reported: the peak resident set size (`ru_maxrss`) before generating
(runtime and weights) and after, and the compiled memory of `generate`'s two programs: the prefill (audio
encoder and prompt) and one decode step after it: the weights' bytes, the decode state's (KV cache), and
each program's temporaries. Prompt and windows are padded to generate's buckets (10 minutes: 16,384
tokens, 20 windows), as in real use. `--aot` only compiles, from abstract weights, so it runs at full
size on a CPU (tiny models cannot show memory). XLA:CPU computes bfloat16 dots in float32 and makes float32 copies
of the bfloat16 weights they read: temporaries a GPU does not have. `--target h100` (or h200, a100,
v5e-1, v6e-1, ...: one device, named as `af3_jax.targets` does) compiles with that accelerator's own
compiler instead, on this machine (deviceless; needs the `accelerators` extra), and says how much of
its memory is left; TPU's compiler refuses a program over the chip's memory, which the table shows.
"""

from __future__ import annotations

import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import af3_jax
from af3_jax import memory, sharding, targets
from af3_jax.buckets import bucket, window_bucket
from af3_jax.checkpoints.pretrained import abstract_model, init_random
from af3_jax.config import AF3Config, MODEL_TYPES
from af3_jax.inference import decode, requests, slots
from af3_jax.models.whisper import tokens_per_window
from presets import model_config

_SIZE = flags.DEFINE_enum("size", "test", ["test", "tiny", "full"], "A model preset (test: the tests' tiny model).")
_MODEL_TYPE = flags.DEFINE_enum("model-type", "audioflamingo3", MODEL_TYPES, "The family, as config.json's model_type.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Parameter and compute dtype.")
_MINUTES = flags.DEFINE_multi_float("minutes", [5, 10], "Audio lengths in minutes (30 s windows, 0.5 to 10; "
                                    "Music Flamingo to 20).")
_NEW = flags.DEFINE_integer("new-tokens", 4, "Tokens to generate.")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "As from_pretrained's quantize.")
_AOT = flags.DEFINE_bool("aot", False, "Only compile the prefill and a decode step from abstract weights and report "
                         "their memory.")
_TARGET = flags.DEFINE_string("target", None, "Compile for this accelerator, one device (h100, v5e-1, ...), instead "
                              "of the host; implies --aot.")
_CHILD = flags.DEFINE_bool("child", False, "Internal: measure one length in this process and print JSON.")

PROMPT = (4, 12)  # text tokens before and after the audio
NEWLINE = 3  # the token id that follows each window's `<sound>` tokens


def nvidia_batch(cfg: AF3Config, minutes: float, seed: int = 0) -> dict[str, np.ndarray]:
  """One row, padded to generate's buckets: text, then `<sound>` x 750 and a newline per window, then text
  (Music Flamingo: its audio bos, `<sound>` x 750 per window, its audio eos)."""
  rng = np.random.default_rng(seed)
  windows = round(2 * minutes)
  text = lambda n: rng.integers(NEWLINE + 1, cfg.audio_token_id, n)
  window = np.concatenate([np.full(tokens_per_window(cfg.encoder), cfg.audio_token_id), [NEWLINE]])
  audio = [window] * windows
  if cfg.rote is not None:
    audio = [[cfg.audio_bos_token_id], np.full(windows * tokens_per_window(cfg.encoder), cfg.audio_token_id),
             [cfg.audio_eos_token_id]]
  ids = np.concatenate([text(PROMPT[0]), *audio, text(PROMPT[1])])
  length, padded_windows = bucket(len(ids), requests.MIN_BUCKET), window_bucket(windows)
  frames = cfg.encoder.mel_frames
  real = np.arange(padded_windows) < windows
  return dict(
      input_ids=np.pad(ids, (length - len(ids), 0))[None].astype(np.int32),
      attention_mask=(np.arange(length) >= length - len(ids))[None].astype(np.int32),
      input_features=rng.standard_normal((padded_windows, cfg.encoder.num_mel_bins, frames), np.float32),
      input_features_mask=np.repeat(real[:, None], frames, axis=1).astype(np.int32),
      audio_embed_mask=np.repeat(real[:, None], tokens_per_window(cfg.encoder), axis=1))


def compiled_memory(cfg: AF3Config, dtype, batch: dict, new_tokens: int, quantize: str,
                    device: jax.Device | None = None) -> dict:
  """Bytes of the weights and of the decode state (KV cache and the rest, as the prefill returns it), and
  the compiled temporaries of `generate`'s start (`decode.start`: the prefill into a cache with room for
  the new tokens) for `batch` and of one decode step after it (`slots.decode_fn`, donating the state, as
  `generate_stream` runs it), from abstract weights: nothing is allocated. `device`: compile
  for it (a compile-only target's); a compiler that refuses a program too big for it gives `error`."""
  mesh = sharding.single_device_mesh(device)
  graphdef, abstract, shardings = abstract_model(cfg, param_dtype=dtype, compute_dtype=dtype, mesh=mesh,
                                                 quantize=quantize)
  on = lambda x, s=jax.NamedSharding(mesh, jax.P()): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  abstract, batch = jax.tree.map(on, abstract, shardings), jax.tree.map(on, batch)
  new_len = bucket(new_tokens, requests.MIN_BUCKET)
  shape = requests.Shape(1, batch["input_ids"].shape[1], batch["input_features"].shape[0])
  _, *rest = requests.dummy_batch(cfg, shape)

  def prefill_fn(state, batch):
    return decode.start(nnx.merge(graphdef, state), batch, *rest, new_len=new_len)

  def step_fn(state, decoding):
    return slots.decode(nnx.merge(graphdef, state), decoding, np.ones(1, np.int32),
                        window=decoding.cache.k.shape[2], steps=1)

  with jax.set_mesh(mesh):
    decoding = jax.tree.map(on, jax.eval_shape(prefill_fn, abstract, batch))
    plans = {"prefill_temp": memory.compiled_plan(jax.jit(prefill_fn).lower(abstract, batch)),
             "step_temp": memory.compiled_plan(jax.jit(step_fn, donate_argnums=1).lower(abstract, decoding))}
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  out = dict(weights=nbytes(abstract), state=nbytes(decoding))
  for key, plan in plans.items():
    if "error" in plan:
      out["error"] = plan["error"]
    else:
      out[key] = round(plan["temporaries_gib"] * 2**30)
  return out


def peak_rss() -> int:
  """This process's peak resident set size in bytes (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(cfg: AF3Config, dtype, minutes: float, new_tokens: int, aot: bool, quantize: str,
            target: str | None = None) -> dict:
  batch = nvidia_batch(cfg, minutes)
  out = dict(minutes=minutes, prompt=int(batch["attention_mask"].sum()), padded=batch["input_ids"].shape[1])
  if not aot:
    model = init_random(cfg, dtype=dtype, quantize=quantize)
    jax.block_until_ready(model.state)
    out["rss_before"] = peak_rss()
    start = time.perf_counter()
    tokens = af3_jax.generate(model, batch, new_tokens, do_sample=False)
    out["seconds"] = time.perf_counter() - start
    out["rss_peak"] = peak_rss()
    if tokens.shape != (1, new_tokens):
      raise RuntimeError(f"generated {tokens.shape}, expected (1, {new_tokens})")
  device = None
  if target:
    target, [device] = targets.compile_only(target)
    out["device"] = target.hbm_bytes
  out.update(compiled_memory(cfg, dtype, batch, new_tokens, quantize, device))
  if "error" not in out:
    # Device memory at the larger of the two programs: weights, decode state, that program's temporaries.
    out["peak"] = out["weights"] + out["state"] + max(out["prefill_temp"], out["step_temp"])
  return out


def row(r: dict) -> str:
  gib = lambda key: f"{r[key] / 2**30:.2f}" if key in r else "-"
  seconds = f"{r['seconds']:.0f}" if "seconds" in r else "-"
  free = "-"
  if "error" in r:
    free = f"does not fit: {r['error']}"
  elif "device" in r:
    free = f"{1 - r['peak'] / r['device']:.0%}" if r["peak"] <= r["device"] else "does not fit"
  return (f"| {r['minutes']:g} min | {r['prompt']:,} ({r['padded']:,}) | {gib('rss_before')} | {gib('rss_peak')} | "
          f"{gib('weights')} | {gib('state')} | {gib('prefill_temp')} | {gib('step_temp')} | {gib('peak')} | {free} | "
          f"{seconds} |")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg, dtype = model_config(_SIZE.value, _MODEL_TYPE.value), jnp.dtype(_DTYPE.value)
  aot = _AOT.value or bool(_TARGET.value)
  if _CHILD.value:
    print(json.dumps(measure(cfg, dtype, _MINUTES.value[0], _NEW.value, aot, _QUANTIZE.value, _TARGET.value)))
    return 0
  most = 20 if cfg.rote is not None else 10
  if not all(0.5 <= m <= most and (2 * m).is_integer() for m in _MINUTES.value):
    print(f"--minutes must be whole 30 s windows from 0.5 to {most} (at most {2 * most} windows)", file=sys.stderr)
    return 1
  try:  # the target checked here, in one line, before any child starts
    target, devices = targets.compile_only(_TARGET.value) if _TARGET.value else (None, jax.devices())
    if target and target.count > 1:
      raise ValueError(f"--target {target.name}: the bench plans one device (e.g. h100, v5e-1)")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  kind = f"{target.name} ({devices[0].device_kind}, {target.hbm_bytes / 2**30:.1f} GiB)" if target else \
      devices[0].device_kind
  family = "Music Flamingo" if cfg.rote is not None else "AF3"
  print(f"{_SIZE.value} {family}, {_DTYPE.value}, quantize {_QUANTIZE.value}, {_NEW.value} new tokens | JAX {jax.__version__} "
        f"{'compiling for' if target else 'on'} {kind} | {datetime.datetime.now().isoformat(timespec='minutes')}",
        flush=True)
  lines = ["| audio | prompt tokens (padded) | RSS before GiB | peak RSS GiB | weights GiB | decode state GiB | "
           "prefill temporaries GiB | step temporaries GiB | device peak GiB | device free | seconds |",
           "|" + "---|" * 11]
  for minutes in _MINUTES.value:
    args = [sys.executable, Path(__file__).resolve(), "--child", f"--minutes={minutes}", f"--size={_SIZE.value}",
            f"--model-type={_MODEL_TYPE.value}", f"--dtype={_DTYPE.value}", f"--new-tokens={_NEW.value}",
            f"--aot={aot}", f"--quantize={_QUANTIZE.value}", *([f"--target={_TARGET.value}"] if _TARGET.value else [])]
    child = subprocess.run(args, capture_output=True, text=True)
    if child.returncode != 0:
      print(f"{minutes} min: the measuring process failed ({child.returncode}):\n{child.stderr[-3000:]}",
            file=sys.stderr)
      return 1
    lines.append(row(json.loads(child.stdout.strip().splitlines()[-1])))
    print(lines[-1], flush=True)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  app.run(main)
