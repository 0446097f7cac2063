"""The HTTP API (FastAPI) over one continuous-batching engine: GET /health, GET /v1/models, POST
/v1/chat/completions (streamed as server-sent events or not) and POST /v1/audio/transcriptions.

The app starts without a model (`create_app`), so /health can say 503 while `Service.start` loads and
compiles what common requests need (`warmup.py`; the rest compiles in the background as it serves); the
caller then sets `app.state.service`. Requests are turned into engine requests on one
worker thread (audio decoding and tokenizing stay off the event loop; the tokenizer is not shared across
threads), and the engine's thread hands each token to the request's asyncio queue. A request whose client
goes away, or whose answer meets a stop string, is cancelled, which frees its slot. Errors are
OpenAI-shaped: 400 for a request that cannot be answered, 404 for another model's name, 413 for a body
over `max_body_bytes`, 429 when the engine's queue is full, 503 while loading or stopping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from af3_jax.checkpoints.pretrained import Model
from af3_jax.data.processor import Processor
from af3_jax.inference.engine import DECODE_STEPS, Engine, QueueFull, Request as EngineRequest
from af3_jax.serving import warmup
from af3_jax.serving.chat import Translator
from af3_jax.serving.protocol import ApiError, ChatRequest, validation_message
from af3_jax.serving.text import Answer

log = logging.getLogger("uvicorn.error")  # beside uvicorn's own lines
# A 10-minute 48 kHz stereo 16-bit WAV is 154 MB in base64; a body far past that is refused unread.
MAX_BODY_BYTES = 256 << 20


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


def create_app(model_name: str, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
  """The app, answering 503 until `app.state.service` is set; its shutdown drains the service."""

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    yield
    if app.state.service is not None:
      app.state.service.stop()

  app = FastAPI(title="af3-jax", lifespan=lifespan)
  app.state.service = None
  app.add_middleware(_BodyLimit, limit=max_body_bytes)

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, e: RequestValidationError):
    return JSONResponse(ApiError(400, validation_message(e.errors())).body(), status_code=400)

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, e: HTTPException):  # an unknown route, a wrong method
    message = f"{e.detail}: {request.method} {request.url.path}"
    return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)

  @app.exception_handler(Exception)
  async def crashed(_, e: Exception):  # logged with its traceback by the server; the app goes on
    return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}").body(), 500)

  def service() -> Service:
    if app.state.service is None:
      raise ApiError(503, "the model is loading; try again when GET /health answers 200", "model_loading")
    return app.state.service

  def check_model(name: str | None) -> None:
    if name is not None and name != model_name:
      raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model_not_found")

  @app.get("/health")
  async def health():
    service()
    return Response(status_code=200)

  @app.get("/v1/models")
  async def models():
    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "af3-jax"}
    if app.state.service is not None:
      card["max_model_len"] = app.state.service.engine.max_len
    return {"object": "list", "data": [card]}

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatRequest, http: Request):
    s = service()
    check_model(body.model)
    request = await _prepare(s, s.translator.chat, body)
    if body.stream:
      events = _events(s, request, body, _Reply(model_name, "chat.completion.chunk"))
      first = await anext(events)  # submits: a refusal is still an error status, not a broken stream
      return StreamingResponse(_prepend(first, events), media_type="text/event-stream")
    text, answer, handle = await _until_done_or_gone(s, request, body.stops, http)
    message = {"role": "assistant", "content": text}
    return _Reply(model_name, "chat.completion").body({"index": 0, "message": message, "logprobs": None,
                       "finish_reason": _finish_reason(answer, handle)}, usage=_usage(handle, answer))

  @app.post("/v1/audio/transcriptions")
  async def transcriptions(http: Request, file: UploadFile = File(...), model: str | None = Form(None),
                           response_format: Literal["json", "text"] = Form("json"),
                           temperature: float = Form(0.0, ge=0, le=1)):
    s = service()
    check_model(model)
    request = await _prepare(s, s.translator.transcription, await file.read(), file.filename or "", temperature)
    text, answer, handle = await _until_done_or_gone(s, request, (), http)
    _finish_reason(answer, handle)  # raises for a failed request
    text = text.strip()
    return PlainTextResponse(text) if response_format == "text" else {"text": text}

  return app


async def _prepare(s: Service, translate, *args) -> EngineRequest:
  """`translate(*args)` on the worker thread; a ValueError is the client's mistake (400)."""
  try:
    return await asyncio.get_running_loop().run_in_executor(s.worker, translate, *args)
  except ValueError as e:
    raise ApiError(400, str(e)) from None


@contextlib.contextmanager
def _submitted(s: Service, request: EngineRequest):
  """Queues a request on the engine for the block: (its handle, the asyncio queue its tokens then None
  arrive on). Leaving the block cancels it (a stop string, a client gone) and frees its slot."""
  loop, queue = asyncio.get_running_loop(), asyncio.Queue()
  try:
    handle = s.engine.submit(request, listener=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
  except QueueFull as e:
    raise ApiError(429, f"the server is busy ({e}); retry later", "rate_limit_exceeded") from None
  except ValueError as e:
    raise ApiError(400, str(e)) from None
  except RuntimeError:
    raise ApiError(503, "the server is shutting down", "shutting_down") from None
  s.running.add(handle)
  try:
    yield handle, queue
  finally:
    s.running.discard(handle)
    s.engine.cancel(handle)


async def _pieces(queue: asyncio.Queue, answer: Answer) -> AsyncIterator[str]:
  """The answer's text pieces as tokens arrive, until the request ends or meets a stop string."""
  while (token := await queue.get()) is not None:
    if piece := answer.add(token):
      yield piece
    if answer.stopped:
      return
  if piece := answer.finish():
    yield piece


async def _until_done_or_gone(s: Service, request: EngineRequest, stops, http: Request):
  """(text, answer, handle) of a request answered whole; cancels it if the client disconnects first."""
  answer = s.answer(stops)

  async def gone() -> None:
    while (await http.receive())["type"] != "http.disconnect":
      pass

  with _submitted(s, request) as (handle, queue):
    done, waiting = None, None
    try:
      done = asyncio.ensure_future(_text(queue, answer))
      waiting = asyncio.ensure_future(gone())
      await asyncio.wait({done, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      for task in (done, waiting):
        if task is not None and not task.done():
          task.cancel()
  if not done.done() or done.cancelled():
    raise ApiError(499, "the client closed the connection")  # nobody reads this
  return done.result(), answer, handle


async def _text(queue: asyncio.Queue, answer: Answer) -> str:
  return "".join([piece async for piece in _pieces(queue, answer)])


async def _events(s: Service, request: EngineRequest, body: ChatRequest, reply: _Reply) -> AsyncIterator[str]:
  """The server-sent events of a streamed chat completion: the role first, the content in pieces, one
  chunk with the finish reason, the usage if asked, then [DONE]. Closing it early (the client went
  away) cancels the request."""
  with _submitted(s, request) as (handle, queue):
    usage = {"usage": None} if body.include_usage else {}
    chunk = lambda delta, reason=None: _sse(reply.body(
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}, **usage))
    yield chunk({"role": "assistant", "content": ""})
    answer = s.answer(body.stops)
    async for piece in _pieces(queue, answer):
      yield chunk({"content": piece})
    try:
      reason = _finish_reason(answer, handle)
    except ApiError as e:
      yield _sse(e.body())
    else:
      yield chunk({}, reason)
      if body.include_usage:
        yield _sse(reply.body(usage=_usage(handle, answer)))
    yield "data: [DONE]\n\n"


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
  yield first
  async for item in rest:
    yield item


def _finish_reason(answer: Answer, handle) -> str:
  """OpenAI's finish_reason for an answered request; ApiError for one the engine failed or dropped."""
  if answer.stopped:
    return "stop"
  result = handle.result()
  if result.finish_reason == "error":
    raise ApiError(500, f"generation failed: {result.error}")
  if result.finish_reason == "cancelled":
    raise ApiError(503, "the server stopped before the answer was done", "shutting_down")
  return result.finish_reason


def _usage(handle, answer: Answer) -> dict:
  """Exact counts: the prompt's tokens include its audio tokens; the completion's run to the eos, or
  to the token that completed a stop string."""
  prompt, completion = handle.prompt_tokens, answer.tokens
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclasses.dataclass
class _Reply:
  """The id, time and model that every object of one response repeats."""

  model: str
  kind: str
  id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  def body(self, choice: dict | None = None, **extra) -> dict:
    return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
            "choices": [] if choice is None else [choice], **extra}


def _sse(obj: dict) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _BodyLimit:
  """Refuses a request body over `limit` bytes with a 413 before anything parses it: by its
  Content-Length, or, for a chunked body, by reading it up to the limit first. No body can exhaust the
  server's memory."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    too_big = JSONResponse(ApiError(413, f"the request body is over {self.limit >> 20} MiB",
                                    "request_too_large").body(), 413)
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None:
      if int(length) > self.limit:
        return await too_big(scope, receive, send)
      return await self.app(scope, receive, send)
    chunks, size, more = [], 0, True
    while more:
      message = await receive()
      if message["type"] == "http.disconnect":
        return
      chunks.append(message.get("body", b""))
      size, more = size + len(chunks[-1]), message.get("more_body", False)
      if size > self.limit:
        return await too_big(scope, receive, send)
    replayed = False

    async def replay():
      nonlocal replayed
      if replayed:
        return await receive()
      replayed = True
      return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    await self.app(scope, replay, send)
