"""What the server holds once started: a loaded, warm engine, the translator of requests into engine
requests and the worker thread it runs on, and the requests being answered."""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import logging
from pathlib import Path

from tokenizers import Tokenizer

from af3_jax.checkpoints.pretrained import Model
from af3_jax.data.processor import Processor
from af3_jax.inference.engine import DECODE_STEPS, Engine
from af3_jax.serving import warmup
from af3_jax.serving.chat import Translator
from af3_jax.serving.text import Answer

log = logging.getLogger("uvicorn.error")  # beside uvicorn's own lines


@dataclasses.dataclass
class Service:
  """A loaded, warm engine and what the routes need besides."""

  engine: Engine
  translator: Translator
  worker: concurrent.futures.ThreadPoolExecutor
  # Answers decode on a copy of the tokenizer: the worker thread encodes on the processor's, and the Rust
  # tokenizer refuses to be borrowed by two threads at once.
  decoder: Tokenizer
  warming: warmup.Background  # compiles the less common shapes while the service answers
  running: set = dataclasses.field(default_factory=set)  # the engine handles of requests being answered

  @classmethod
  def start(cls, model: Model, processor: Processor, *, max_slots: int, max_len: int | None = None,
            think: bool = False, media_root: str | Path | None = None, decode_steps: int = DECODE_STEPS) -> Service:
    """Builds the engine, compiles what common requests need, starts its thread, the rest compiling in the
    background (`warmup.start`)."""
    engine = Engine(model, max_slots=max_slots, max_len=max_len, decode_steps=decode_steps)
    warming = warmup.start(engine, log, processor.max_windows)
    engine.start()
    root = Path(media_root).resolve() if media_root is not None else None
    return cls(engine, Translator(processor, engine.max_len, think, root),
               concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="af3-requests"),
               copy.deepcopy(processor.tokenizer.backend_tokenizer), warming)

  def answer(self, stops=()) -> Answer:
    return Answer(self.decoder, stops)

  def stop(self) -> None:
    """Refuses new requests and returns once every running one is answered (and the program compiling
    in the background is done)."""
    self.warming.stop()
    self.engine.stop(drain=True)
    self.worker.shutdown()

  def cut_short(self) -> None:
    """Ends every request being answered at the engine's next step, without waiting (a signal handler
    calls it): each client gets a 503, or its stream an error event and [DONE]."""
    for handle in list(self.running):
      self.engine.cancel(handle)
