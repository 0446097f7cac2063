"""A cap on request bodies, enforced before anything parses them."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from af3_jax.serving.protocol import ApiError

# A 10-minute 48 kHz stereo 16-bit WAV is 154 MB in base64; a body far past that is refused unread.
MAX_BODY_BYTES = 256 << 20


class BodyLimit:
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
