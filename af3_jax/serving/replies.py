"""One request answered over HTTP: submitted to the engine for as long as it is answered, its text
gathered whole (cancelled if the client goes away) or sent as server-sent events, with OpenAI's
finish_reason and usage; engine refusals become OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from af3_jax.inference.engine import QueueFull, Request as EngineRequest
from af3_jax.serving.protocol import ApiError, ChatRequest
from af3_jax.serving.service import Service
from af3_jax.serving.text import Answer


async def prepare(s: Service, translate, *args) -> EngineRequest:
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


async def until_done_or_gone(s: Service, request: EngineRequest, stops, http: Request):
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


async def events(s: Service, request: EngineRequest, body: ChatRequest, reply: Reply) -> AsyncIterator[str]:
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
      reason = finish_reason(answer, handle)
    except ApiError as e:
      yield _sse(e.body())
    else:
      yield chunk({}, reason)
      if body.include_usage:
        yield _sse(reply.body(usage=token_usage(handle, answer)))
    yield "data: [DONE]\n\n"


async def prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
  yield first
  async for item in rest:
    yield item


def finish_reason(answer: Answer, handle) -> str:
  """OpenAI's finish_reason for an answered request; ApiError for one the engine failed or dropped."""
  if answer.stopped:
    return "stop"
  result = handle.result()
  if result.finish_reason == "error":
    raise ApiError(500, f"generation failed: {result.error}")
  if result.finish_reason == "cancelled":
    raise ApiError(503, "the server stopped before the answer was done", "shutting_down")
  return result.finish_reason


def token_usage(handle, answer: Answer) -> dict:
  """Exact counts: the prompt's tokens include its audio tokens; the completion's run to the eos, or
  to the token that completed a stop string."""
  prompt, completion = handle.prompt_tokens, answer.tokens
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclasses.dataclass
class Reply:
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
