"""Start-up: how long serve.py takes to answer GET /health with 200 (and to finish its background warm-up),
and infer.py to answer one clip, on a new machine (an empty compilation cache: cold) and on the next
start (the cache the first one filled: warm), each a fresh process, with the programs each compiled.

  python bench/bench_start.py --model PATH [--max-model-len N] [--dtype float32]
  (from the repo root; PATH: any checkpoint folder, e.g. the tests' tiny one)

Each program runs as the user runs it, under bench/counting.py, which counts jax's compile events:
compiles (XLA compiles and persistent-cache hits alike) and cache misses (programs XLA really compiled). serve.py is
stopped with SIGTERM once its log says the background warm-up is done; infer.py answers a 3 s noise clip
with 8 new tokens. The two runs share a cache folder made for the bench (--compilation-cache).
"""

from __future__ import annotations

import datetime
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import soundfile as sf
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
_MODEL = flags.DEFINE_string("model", None, "A checkpoint folder.", required=True)
_MAX_LEN = flags.DEFINE_integer("max-model-len", None, "serve.py's --max-model-len (default: the model's context).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Both programs' --dtype.")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds a start may take.")

def counts(log: str) -> tuple[int, int]:
  """(compiles, cache misses) from the stderr of a program run by counting.py."""
  found = re.findall(r"^compiles (\d+) (\d+) \d+$", log, re.M)
  return tuple(map(int, found[-1])) if found else (-1, -1)


def serve(cache: Path) -> dict:
  """One serve.py start: seconds to /health 200 and to the end of the background warm-up, and its counts."""
  with socket.create_server(("127.0.0.1", 0)) as probe:
    port = probe.getsockname()[1]
  args = ["serve.py", "--model", _MODEL.value, "--port", str(port), "--dtype", _DTYPE.value,
          "--compilation-cache", str(cache)] + (["--max-model-len", str(_MAX_LEN.value)] if _MAX_LEN.value else [])
  started = time.perf_counter()
  proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "counting.py"), *args], cwd=ROOT,
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  lines: list[str] = []
  warmed = threading.Event()

  def read() -> None:
    for line in proc.stderr:
      lines.append(line)
      if re.search(r"loaded in|warm-up|ready:", line):
        print("  serve.py:", line.rstrip(), flush=True)
      if re.search(r"background warm-up: (\d+)/\1 ", line):
        warmed.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  ready = None
  try:
    while ready is None:
      if proc.poll() is not None or time.perf_counter() - started > _TIMEOUT.value:
        raise RuntimeError("serve.py did not start:\n" + "".join(lines[-20:]))
      try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        if conn.getresponse().status == 200:
          ready = time.perf_counter() - started
      except OSError:
        pass
      time.sleep(0.2)
    warmed.wait(_TIMEOUT.value)
    background = time.perf_counter() - started
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
  finally:
    proc.kill()
  reader.join()
  compiles, misses = counts("".join(lines))
  return {"ready_s": ready, "background_done_s": background, "compiles": compiles, "misses": misses}


def infer(cache: Path, clip: Path) -> dict:
  """One infer.py answer: its wall seconds and counts."""
  args = ["infer.py", "--model", _MODEL.value, "--audio", str(clip), "--max-new-tokens", "8", "--dtype", _DTYPE.value,
          "--compilation-cache", str(cache)]
  started = time.perf_counter()
  run = subprocess.run([sys.executable, str(ROOT / "bench" / "counting.py"), *args], cwd=ROOT, capture_output=True,
                       text=True,
                       timeout=_TIMEOUT.value)
  if run.returncode:
    raise RuntimeError("infer.py failed:\n" + run.stderr[-3000:])
  compiles, misses = counts(run.stderr)
  return {"answer_s": time.perf_counter() - started, "compiles": compiles, "misses": misses}


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  env = "JAX_PLATFORMS=" + os.environ.get("JAX_PLATFORMS", "")
  print(f"{_MODEL.value}, {_DTYPE.value}, max-model-len {_MAX_LEN.value or 'the context'} | JAX {jax.__version__} "
        f"on {jax.devices()[0].device_kind} ({env}, {os.cpu_count()} CPUs) | "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}", flush=True)
  rows = ["| program | start | seconds | compiles | of them compiled (cache misses) |", "|---|---|---|---|---|"]
  with tempfile.TemporaryDirectory() as tmp:
    clip = Path(tmp) / "clip.wav"
    sf.write(clip, 0.1 * np.random.default_rng(0).standard_normal(48000), 16000)
    for name in ("serve", "infer"):
      cache = Path(tmp) / f"cache-{name}"
      for start in ("cold", "warm"):
        r = serve(cache) if name == "serve" else infer(cache, clip)
        print(f"{name}.py {start}: {r}", flush=True)
        seconds = (f"{r['ready_s']:.1f} to /health 200, {r['background_done_s']:.1f} to the background's end"
                   if name == "serve" else f"{r['answer_s']:.1f} to the answer")
        rows.append(f"| {name}.py | {start} | {seconds} | {r['compiles']} | {r['misses']} |")
  print("\n" + "\n".join(rows))
  return 0


if __name__ == "__main__":
  app.run(main)
