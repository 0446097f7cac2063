"""The HTTP API (FastAPI) over one continuous-batching engine: GET /health, GET /v1/models, POST
/v1/chat/completions (streamed as server-sent events or not) and POST /v1/audio/transcriptions.

The app starts without a model (`create_app`), so /health can say 503 while `Service.start` (`service.py`)
loads and compiles what common requests need (`warmup.py`; the rest compiles in the background as it
serves); the caller then sets `app.state.service`. Each request is answered by `replies.py`. Requests are
turned into engine requests on one worker thread (audio decoding and tokenizing stay off the event loop;
the tokenizer is not shared across threads), and the engine's thread hands each token to the request's
asyncio queue. A request whose client goes away, or whose answer meets a stop string, is cancelled, which
frees its slot. Errors are OpenAI-shaped: 400 for a request that cannot be answered, 404 for another
model's name, 413 for a body over `max_body_bytes`, 429 when the engine's queue is full, 503 while
loading or stopping.
"""

from __future__ import annotations

import contextlib
from typing import Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from af3_jax.serving import replies
from af3_jax.serving.body_limit import MAX_BODY_BYTES, BodyLimit
from af3_jax.serving.protocol import ApiError, ChatRequest, validation_message
from af3_jax.serving.service import Service


def create_app(model_name: str, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
  """The app, answering 503 until `app.state.service` is set; its shutdown drains the service."""

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    yield
    if app.state.service is not None:
      app.state.service.stop()

  app = FastAPI(title="af3-jax", lifespan=lifespan)
  app.state.service = None
  app.add_middleware(BodyLimit, limit=max_body_bytes)

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
    request = await replies.prepare(s, s.translator.chat, body)
    if body.stream:
      events = replies.events(s, request, body, replies.Reply(model_name, "chat.completion.chunk"))
      first = await anext(events)  # submits: a refusal is still an error status, not a broken stream
      return StreamingResponse(replies.prepend(first, events), media_type="text/event-stream")
    text, answer, handle = await replies.until_done_or_gone(s, request, body.stops, http)
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": replies.finish_reason(answer, handle)}
    return replies.Reply(model_name, "chat.completion").body(choice, usage=replies.token_usage(handle, answer))

  @app.post("/v1/audio/transcriptions")
  async def transcriptions(http: Request, file: UploadFile = File(...), model: str | None = Form(None),
                           response_format: Literal["json", "text"] = Form("json"),
                           temperature: float = Form(0.0, ge=0, le=1)):
    s = service()
    check_model(model)
    request = await replies.prepare(s, s.translator.transcription, await file.read(), file.filename or "", temperature)
    text, answer, handle = await replies.until_done_or_gone(s, request, (), http)
    replies.finish_reason(answer, handle)  # raises for a failed request
    text = text.strip()
    return PlainTextResponse(text) if response_format == "text" else {"text": text}

  return app
