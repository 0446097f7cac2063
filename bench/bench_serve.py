"""Serving speed: N concurrent clients against our server (serve.py's app and engine, over HTTP on
127.0.0.1), and the same requests through transformers' `generate` loop, both with random weights, in
one run.

  python bench/bench_serve.py --size test --clients 1 --clients 4 --requests 2   # CPU: shows it runs
  python bench/bench_serve.py --size full                                         # one GPU
  python bench/bench_serve.py --size test --engine-only --clients 32 --new-tokens 128   # the engine's levers
  (from the repo root, with af3_jax installed or PYTHONPATH=.)

Each client sends --requests requests one after another (a closed loop), each a chat completion with 30
s of synthesised audio (a noise WAV, base64 `input_audio`) and a short question, streamed, decoding
exactly --new-tokens tokens (the random model has no eos). Our server decodes them on the engine's slots
(--max-slots), so a request starts as soon as a slot is free; requests that wait together are prefilled
in one call, and each dispatch decodes up to --decode-steps tokens per slot. The transformers loop is
what serving with `generate` does: every round takes the next request of each client and answers them as
one padded batch (our processor's inputs, made inside the timed loop as the server makes them). TTFT is
from a request's send (for transformers: its round's start) to its first answer text; output tokens/s
counts every request's tokens over the level's wall time. --max-len sets the engine's cache length, as
serve.py's --max-model-len does (its default, the model's context, is 32,768 slots a row): a decode step
reads only the window its longest request needs, so short requests should decode as fast in a long cache
as in a short one. Last, the engine alone (no HTTP; inputs prepared ahead) answers all the requests of
the largest level at once, as it did before issue 21 (one request a prefill, a token a dispatch), with
requests prefilled together, and with 8 tokens a dispatch (multi-step): what each lever gives. vLLM is
left out: it serves from a checkpoint folder, not random weights in memory. The server decodes real
audio, so the audio stack (soundfile, librosa) must be installed."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX would take 75% of the GPU from torch

import base64
import dataclasses
import datetime
import http.client
import io
import json
import socket
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
import torch
import transformers
import uvicorn
from absl import app, flags

from af3_jax import sharding
from af3_jax.buckets import bucket
from af3_jax.checkpoints.pretrained import init_random
from af3_jax.data.processor import Processor
from af3_jax.inference.engine import DECODE_STEPS, Engine, Request as EngineRequest
from af3_jax.serving.app import create_app
from af3_jax.serving.service import Service
from presets import MODELS, TokenClock, torch_model, with_tokenizer

_SIZE = flags.DEFINE_enum("size", "test", list(MODELS), "The model (bench/presets.py), random weights.")
_CLIENTS = flags.DEFINE_multi_integer("clients", [1, 8, 32], "Concurrent clients, one table row each.")
_REQUESTS = flags.DEFINE_integer("requests", 4, "Requests each client sends, one after another.", lower_bound=1)
_NEW = flags.DEFINE_integer("new-tokens", 64, "Tokens every answer decodes.", lower_bound=1)
_SLOTS = flags.DEFINE_integer("max-slots", 32, "The server engine's decode slots.", lower_bound=1)
_STEPS = flags.DEFINE_integer("decode-steps", DECODE_STEPS, "The engine's decode steps per dispatch (serve.py's "
                              "--num-scheduler-steps; 1: a host round trip per token).", lower_bound=1)
_MAX_LEN = flags.DEFINE_integer("max-len", None, "The server engine's max_len, its cache slots per row (default: "
                                "what the requests need, bucketed; serve.py's is the model's context).", lower_bound=2)
_DEVICE = flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "Where both run (auto: gpu if torch sees one).")
_ENGINE_ONLY = flags.DEFINE_bool("engine-only", False, "Only the engine-alone table (no HTTP server, no transformers).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype, both sides.")

QUESTION = "Describe the audio in detail."
SECONDS = 30.0


@dataclasses.dataclass
class Level:
  """One row's measurements: wall seconds, each request's TTFT, output tokens."""

  wall: float
  ttft: list[float]
  tokens: int

  def summary(self) -> dict[str, float]:
    ttft = sorted(self.ttft)
    return {"req_s": len(ttft) / self.wall, "p50": statistics.median(ttft),
            "p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))], "tok_s": self.tokens / self.wall}


def clip(seed: int) -> np.ndarray:
  """30 s of 16 kHz noise, a different clip per request."""
  return (0.1 * np.random.default_rng(seed).standard_normal(int(SECONDS * 16000))).astype(np.float32)


def wav_base64(wave: np.ndarray) -> str:
  buffer = io.BytesIO()
  sf.write(buffer, wave, 16000, format="WAV", subtype="PCM_16")
  return base64.b64encode(buffer.getvalue()).decode()


def http_client(port: int, bodies: list[bytes], ttft: list[float], tokens: list[int]) -> None:
  """One client's closed loop: each request streamed to its end; TTFT at its first answer text."""
  for body in bodies:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
      raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]!r}")
    first = None
    for line in response:
      if not line.startswith(b"data: {"):
        continue
      event = json.loads(line[6:])
      if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
        first = time.perf_counter() - start
      if event.get("usage"):
        tokens.append(event["usage"]["completion_tokens"])
    ttft.append(first if first is not None else time.perf_counter() - start)
    conn.close()


def serve_level(port: int, clients: int, requests: int, n: int) -> Level:
  bodies = [[json.dumps({"messages": [{"role": "user", "content": [
      {"type": "input_audio", "input_audio": {"data": wav_base64(clip(c * requests + r)), "format": "wav"}},
      {"type": "text", "text": QUESTION}]}], "max_tokens": n, "temperature": 0, "stream": True,
      "stream_options": {"include_usage": True}}).encode() for r in range(requests)] for c in range(clients)]
  ttft, tokens = [], []
  threads = [threading.Thread(target=http_client, args=(port, b, ttft, tokens)) for b in bodies]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  if len(ttft) != clients * requests or sum(tokens) != clients * requests * n:
    raise RuntimeError(f"{len(ttft)} answers with {sum(tokens)} tokens; expected {clients * requests} of {n}")
  return Level(wall, ttft, sum(tokens))


def torch_round(model, processor: Processor, waves: list[np.ndarray], n: int) -> float:
  """One batch through our processor and `generate`; returns the seconds to the first new token."""
  conversations = [[{"role": "user", "content": [{"type": "audio", "audio": w}, {"type": "text", "text": QUESTION}]}]
                   for w in waves]
  start = time.perf_counter()
  batch = processor.apply_chat_template(conversations)
  inputs = {k: torch.from_numpy(np.asarray(v)).to(model.device) for k, v in batch.items()}
  inputs["input_ids"] = inputs["input_ids"].long()
  inputs["input_features"] = inputs["input_features"].to(model.dtype)
  clock = TokenClock()
  with torch.inference_mode():
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, streamer=clock)
  if out.shape[1] - batch["input_ids"].shape[1] != n:
    raise RuntimeError(f"torch decoded {out.shape[1] - batch['input_ids'].shape[1]} tokens, expected {n}")
  return clock.times[1] - start


def torch_level(model, processor: Processor, clients: int, requests: int, n: int) -> Level:
  ttft = []
  start = time.perf_counter()
  for r in range(requests):
    ttft += [torch_round(model, processor, [clip(c * requests + r) for c in range(clients)], n)] * clients
  return Level(time.perf_counter() - start, ttft, clients * requests * n)


def start_server(model, processor: Processor, slots: int, max_len: int) -> tuple[uvicorn.Server, threading.Thread, int]:
  """A warm server on a free port, in a thread, its background warm-up done too (the levels measure a
  server that compiles nothing); its shutdown (should_exit, then join) drains the engine."""
  app_ = create_app("bench")
  app_.state.service = Service.start(model, processor, max_slots=slots, max_len=max_len, decode_steps=_STEPS.value)
  app_.state.service.warming.join()
  listener = socket.create_server(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app_, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  return server, thread, listener.getsockname()[1]


def engine_tokens_per_s(model, processor: Processor, count: int, n: int, max_len: int, steps: int,
                        prefill_tokens: int) -> float:
  """The engine alone (no HTTP, inputs prepared ahead): output tokens/s over `count` requests submitted at
  once, the best of two identical bursts after a first that compiles."""
  batches = [processor.collate([processor.encode([{"role": "user", "content": [
      {"type": "audio", "audio": clip(i)}, {"type": "text", "text": QUESTION}]}])]) for i in range(count)]
  requests = [EngineRequest({k: v[0] if k == "input_ids" else v for k, v in b.items() if k != "attention_mask"}, n,
                            do_sample=False) for b in batches]
  engine = Engine(model, max_slots=_SLOTS.value, max_len=max_len, decode_steps=steps, prefill_tokens=prefill_tokens)
  walls = []
  for _ in range(3):
    started = time.perf_counter()
    list(engine.map(requests, lambda r: r))
    walls.append(time.perf_counter() - started)
  return count * n / min(walls[1:])


def table(header: str, ours: dict, theirs: dict) -> str:
  lines = [header, "| clients | requests | JAX req/s | torch req/s | JAX TTFT p50 / p95 s | torch TTFT p50 / p95 s | "
           "JAX out tok/s | torch out tok/s |", "|---|---|---|---|---|---|---|---|"]
  for clients, level in ours.items():
    j, t = level.summary(), theirs[clients].summary()
    lines.append(f"| {clients} | {len(level.ttft)} | {j['req_s']:.2f} | {t['req_s']:.2f} | {j['p50']:.2f} / "
                 f"{j['p95']:.2f} | {t['p50']:.2f} / {t['p95']:.2f} | {j['tok_s']:.1f} | {t['tok_s']:.1f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  base = MODELS[_SIZE.value]
  cfg, tokenizer = with_tokenizer(base)
  processor = Processor(tokenizer, style="hf")
  n, requests = _NEW.value, _REQUESTS.value
  platform = _DEVICE.value if _DEVICE.value != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
  torch_device, jax_device = ("cuda" if platform == "gpu" else "cpu"), jax.devices(platform)[0]
  header = (f"{_SIZE.value} AF3 (random weights), {_DTYPE.value}, {SECONDS:g} s of audio and {n} new tokens per "
            f"request, {requests} requests per client, {_SLOTS.value} engine slots, {_STEPS.value} decode steps "
            f"per dispatch, max_len "
            f"{_MAX_LEN.value or 'as needed'} | JAX {jax.__version__} on {jax_device.device_kind} | torch "
            f"{torch.__version__} (transformers {transformers.__version__}) on "
            f"{torch.cuda.get_device_name() if torch_device == 'cuda' else 'cpu'} | "
            f"{datetime.datetime.now().isoformat(timespec='minutes')}")
  print(header, flush=True)
  prompt = len(processor.encode([{"role": "user", "content": [{"type": "audio", "audio": clip(0)},
                                                              {"type": "text", "text": QUESTION}]}]).ids)
  if not _ENGINE_ONLY.value:
    server_levels(processor, cfg, torch_device, header, prompt)
  jmodel = init_random(cfg, dtype=jnp.dtype(_DTYPE.value), mesh=sharding.single_device_mesh(jax_device))
  count, max_len = max(_CLIENTS.value) * requests, _MAX_LEN.value or bucket(prompt + n)
  levers = {"one request a prefill, 1 token a dispatch (the engine before)": (1, 1),
            "requests prefilled together, 1 token a dispatch": (1, 8192),
            "requests prefilled together, 8 tokens a dispatch (multi-step)": (8, 8192)}
  engine_rows = []
  for name, (steps, budget) in levers.items():
    engine_rows.append(f"| {name} | {engine_tokens_per_s(jmodel, processor, count, n, max_len, steps, budget):.1f} |")
    print(f"engine alone, {name}: {engine_rows[-1]}", flush=True)
  print(f"\nThe engine alone, {count} requests at once, {_SLOTS.value} slots:\n| engine | out tok/s |\n|---|---|")
  print("\n".join(engine_rows))
  return 0


def server_levels(processor: Processor, cfg, torch_device: str, header: str, prompt: int) -> None:
  """The server against transformers' generate loop at each --clients level (transformers first, its
  model gone before JAX's loads); prints their table."""
  n, requests = _NEW.value, _REQUESTS.value
  model = torch_model(cfg, getattr(torch, _DTYPE.value), torch_device)
  torch_round(model, processor, [clip(10**6)], n)  # warm-up: kernel selection, allocator growth
  theirs = {}
  for clients in _CLIENTS.value:
    theirs[clients] = torch_level(model, processor, clients, requests, n)
    print(f"torch, {clients} clients: {theirs[clients].summary()}", flush=True)
  del model
  if torch_device == "cuda":
    torch.cuda.empty_cache()

  jax_device = jax.devices("gpu" if torch_device == "cuda" else "cpu")[0]
  jmodel = init_random(cfg, dtype=jnp.dtype(_DTYPE.value), mesh=sharding.single_device_mesh(jax_device))
  started = time.perf_counter()
  server, thread, port = start_server(jmodel, processor, _SLOTS.value, _MAX_LEN.value or bucket(prompt + n))
  print(f"server warm in {time.perf_counter() - started:.1f} s (prompt {prompt} tokens)", flush=True)
  serve_level(port, 1, 1, n)  # the first request's host-side paths
  ours = {}
  for clients in _CLIENTS.value:
    ours[clients] = serve_level(port, clients, requests, n)
    print(f"JAX server, {clients} clients: {ours[clients].summary()}", flush=True)
  # Stopped before the interpreter exits: a jax call still running in the engine's thread then aborts it.
  server.should_exit = True
  thread.join()
  print("\n" + table(header, ours, theirs), flush=True)


if __name__ == "__main__":
  app.run(main)
