"""Serve Audio Flamingo 3 over OpenAI's API (chat completions with audio, transcriptions), on the
continuous-batching engine.

  python serve.py --model PATH_OR_HUB_ID [--host 127.0.0.1] [--port 8000] [--max-slots N] [--dtype ...]
                  [--quantize int8] [--think] [--served-model-name NAME] [--allowed-local-media-path DIR]
                  [--max-model-len N] [--num-scheduler-steps N] [--compilation-cache DIR|off]

The server listens at once and answers GET /health with 503 while the model loads and compiles what
common requests need, then 200; the other shapes compile in the background (a line per phase in the log).
SIGTERM (or Ctrl-C) stops accepting, finishes the requests already running, and exits 0 (130 for Ctrl-C);
a second signal ends the running requests at once instead (each client gets a 503, or its stream an
error event and [DONE]); a third quits without waiting for anything.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from absl import flags

import cli

# Flags of their own, not absl's global set: tests load infer.py, which defines some of the same names.
FLAGS = flags.FlagValues()
_MODEL = flags.DEFINE_string("model", None, "Checkpoint folder or hub id.", flag_values=FLAGS)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).", flag_values=FLAGS)
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535, flag_values=FLAGS)
_MAX_SLOTS = flags.DEFINE_integer("max-slots", 8, "Requests decoded together (the engine's slots); more wait "
                                  "for a free slot.", lower_bound=1, flag_values=FLAGS)
_MAX_LEN = flags.DEFINE_integer("max-model-len", None, "Prompt plus answer tokens per request (default: the "
                                "model's context); the KV cache holds this many per slot.", lower_bound=2,
                                flag_values=FLAGS)
# 1: engine.DECODE_STEPS, written out so that --help answers without importing jax.
_STEPS = flags.DEFINE_integer("num-scheduler-steps", 1, "Tokens each request decodes per engine dispatch (vLLM's "
                               "multi-step scheduling): one host round trip per this many tokens, which stream in "
                               "pieces of up to as many. Above 1 the dispatch is a device loop, in which XLA:GPU "
                               "copies the MLP weights every step (docs/performance.md).", lower_bound=1,
                               flag_values=FLAGS)
_DTYPE, _QUANTIZE = cli.weight_flags(FLAGS)
_CACHE = cli.compilation_cache_flag(FLAGS)
_THINK = flags.DEFINE_bool("think", False, "Think mode: merge the checkpoint's think/ (or stage35/) adapter and "
                           "ask the model to reason before it answers, on every request.", flag_values=FLAGS)
_NAME = flags.DEFINE_string("served-model-name", None, "The model's name in the API (default: --model).",
                            flag_values=FLAGS)
_MEDIA = flags.DEFINE_string("allowed-local-media-path", None, "A folder whose audio files requests may name "
                             "(file:// URLs or paths in audio_url); without it, only audio sent in the request.",
                             flag_values=FLAGS)


def run() -> int:
  """Checks what can be checked at once, then serves until SIGTERM or Ctrl-C; returns the exit status."""
  if _MODEL.value is None:
    raise ValueError("give --model PATH_OR_HUB_ID")
  if _MEDIA.value is not None and not Path(_MEDIA.value).is_dir():
    raise ValueError(f"{_MEDIA.value}: --allowed-local-media-path is not a folder")
  listener = socket.create_server((_HOST.value, _PORT.value))  # a port in use fails here, in one line
  cache = cli.use_compilation_cache(_CACHE.value)
  from af3_jax.checkpoints import locate
  from af3_jax.inference import assistant
  from af3_jax.serving import app as serving
  from af3_jax.serving.service import Service, log

  root = locate.resolve(_MODEL.value)
  if _THINK.value:
    locate.think_adapter(root)  # a missing adapter fails now, not after the server is up
  name = _NAME.value or _MODEL.value
  app = serving.create_app(name)
  server = _Server(uvicorn.Config(app, log_level="info"), app)
  failed: list[BaseException] = []

  def load() -> None:
    try:
      started = time.perf_counter()
      log.info("loading %s (%s); compiled programs are kept in %s", root,
               cli.weights_label(_DTYPE.value, _QUANTIZE.value, _THINK.value),
               cache or "no folder (--compilation-cache off)")
      model, processor = assistant.load(root, dtype=_DTYPE.value, think=_THINK.value, style="hf",
                                        quantize=_QUANTIZE.value)
      log.info("loaded in %.1f s", time.perf_counter() - started)
      app.state.service = Service.start(model, processor, max_slots=_MAX_SLOTS.value, max_len=_MAX_LEN.value,
                                        think=_THINK.value, media_root=_MEDIA.value, decode_steps=_STEPS.value)
      host, port = listener.getsockname()[:2]
      log.info("ready: %r on http://%s:%d/v1, %d slots, context %d tokens", name, host, port, _MAX_SLOTS.value,
               app.state.service.engine.max_len)
    except Exception as e:  # noqa: BLE001: whatever failed, the server must not stay up unready
      failed.append(e)
      server.should_exit = True

  loader = threading.Thread(target=load, name="af3-load", daemon=True)
  loader.start()
  # uvicorn drains on SIGTERM or Ctrl-C, then raises the signal again once its own handler is gone: the
  # status to exit with (0, 130) is noted then.
  stopped_by = [0]
  signal.signal(signal.SIGTERM, lambda *_: stopped_by.append(0))
  signal.signal(signal.SIGINT, lambda *_: stopped_by.append(cli.INTERRUPTED))
  server.run(sockets=[listener])
  if failed:
    raise failed[0]
  if loader.is_alive():
    # Stopped while the model loads: the loader is inside jax (reading weights, compiling), which cannot
    # be interrupted, and tearing the interpreter down under it aborts the process (a C++ terminate,
    # exit 134). Nothing is served or written yet, so leave without the teardown.
    log.info("stopped while loading")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(stopped_by[-1])
  return stopped_by[-1]


class _Server(uvicorn.Server):
  """uvicorn's server, but a second SIGINT or SIGTERM cuts the running answers short (`Service.cut_short`)
  rather than cancelling their tasks, which answered clients with a bare 500 or a stream without its end,
  and logged a traceback for each; a third quits at once (uvicorn's force exit)."""

  def __init__(self, config: uvicorn.Config, app):
    super().__init__(config)
    self.app = app
    self.signals = 0

  def handle_exit(self, sig: int, frame) -> None:
    self.signals += 1
    service = self.app.state.service
    if self.signals == 2 and service is not None:
      self._captured_signals.append(sig)  # re-raised when uvicorn is done, for the exit status
      service.cut_short()
      uvicorn.server.logger.info("cutting the running requests short; a third signal quits at once")
      return
    super().handle_exit(sig if self.signals < 3 else signal.SIGINT, frame)


def main(argv: list[str]) -> None:
  cli.main(FLAGS, __doc__, argv, run)


if __name__ == "__main__":
  cli.process(lambda: main(sys.argv))
