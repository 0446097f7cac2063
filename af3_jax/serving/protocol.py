"""OpenAI's chat-completions request body as vLLM takes it, checked by pydantic (FastAPI answers a
body that does not fit with an error, which the app turns into a 400), and OpenAI's error shape.

Content parts: `text`, `input_audio` ({"data": base64, "format"}) and `audio_url` ({"url"}: a `data:`
URL or a local file). Fields that do not change the answer (`user`, `metadata`...) are ignored, as vLLM
ignores them. Fields that would change it and that we do not implement (`logprobs`, the frequency and
presence penalties, `logit_bias`, `tools`, a JSON `response_format`, `n` > 1) are refused unless left at
their defaults: answering as if they were not sent would be a silent difference from vLLM. vLLM's own
sampling extensions `top_k` and `repetition_penalty` are taken (the engine has both).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Fields we do not implement -> the values that mean "off" (OpenAI's defaults).
NOT_IMPLEMENTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (None, 0),
                   "presence_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
                   "response_format": (None, {"type": "text"})}
# jax.random.key keeps 32 bits of a seed: larger ones would silently share streams, so they are refused.
SEED_LIMIT = 2**31


class ApiError(Exception):
  """An error answered in OpenAI's shape, with its HTTP status: `{"error": {"message", "type", "param",
  "code"}}`, the type OpenAI gives the status ("invalid_request_error" for a client's mistake, "requests"
  for a rate limit, "server_error" for ours) and `code` a short string or null (OpenAI's
  "model_not_found", "rate_limit_exceeded"), never the status again."""

  def __init__(self, status: int, message: str, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.code = status, message, code

  def body(self) -> dict:
    kind = "server_error" if self.status >= 500 else "requests" if self.status == 429 else "invalid_request_error"
    return {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}


class _Body(BaseModel):
  model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
  type: Literal["text"]
  text: str


class InputAudio(_Body):
  data: str
  format: Literal["wav", "mp3", "flac", "ogg"]


class InputAudioPart(_Body):
  type: Literal["input_audio"]
  input_audio: InputAudio


class AudioUrl(_Body):
  url: str


class AudioUrlPart(_Body):
  type: Literal["audio_url"]
  audio_url: AudioUrl  # a bare string is refused, as in vLLM (tests/entrypoints/openai/test_audio.py)


Part = Annotated[TextPart | InputAudioPart | AudioUrlPart, Field(discriminator="type")]


class Message(_Body):
  role: Literal["system", "user", "assistant"]
  content: str | list[Part]


class StreamOptions(_Body):
  include_usage: bool = False


class ChatRequest(_Body):
  model: str | None = None
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy
  top_p: float | None = Field(None, gt=0, le=1)
  seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
  stop: str | list[str] | None = None
  stream: bool | None = False  # null is OpenAI's default, as for n: some clients send it
  stream_options: StreamOptions | None = None
  n: int | None = Field(1, ge=1, le=1)
  top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
  repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extension; 1: off
  logprobs: bool | None = None
  top_logprobs: int | None = None
  frequency_penalty: float | None = None
  presence_penalty: float | None = None
  logit_bias: dict | None = None
  tools: list | None = None
  response_format: dict | None = None

  @model_validator(mode="after")
  def _implemented(self) -> ChatRequest:
    asked = [name for name, off in NOT_IMPLEMENTED.items() if getattr(self, name) not in off]
    if asked:
      raise ValueError(f"{', '.join(asked)}: not implemented by this server; leave {'it' if len(asked) == 1 else 'them'} "
                       "out (or at the default)")
    return self

  @property
  def stops(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

  @property
  def include_usage(self) -> bool:
    return self.stream_options is not None and self.stream_options.include_usage


def validation_message(errors: list[dict]) -> str:
  """pydantic's errors as one line, `where: what` for each, where written as in our own messages
  (`messages[0].content[1].input_audio.format`)."""
  if errors[0]["type"] == "json_invalid":
    return f"the body is not valid JSON ({errors[0]['ctx']['error']} at character {errors[0]['loc'][-1]})"
  if errors[0]["loc"] == ("body",) and isinstance(errors[0].get("input"), bytes):  # FastAPI left it unparsed
    return "the body was not read as JSON: send it with the header content-type: application/json"
  # A union tries each member: of the errors under one union field, keep only those of the member the
  # input was meant for (the deepest), so a list content with one bad part does not also say "content:
  # not a valid string". Errors elsewhere in the body stay.
  union = lambda loc: next((loc[:i] for i, x in enumerate(loc) if _member(x)), None)  # the union field
  deepest: dict[tuple, int] = {}
  for e in errors:
    if (field := union(e["loc"])) is not None:
      deepest[field] = max(deepest.get(field, 0), len(e["loc"]))
  said: dict[str, list[str]] = {}
  for e in errors:
    if (field := union(e["loc"])) is not None and len(e["loc"]) < deepest[field]:
      continue
    said.setdefault(_where(e["loc"]), []).append(e["msg"].removeprefix("Value error, "))
  # Each member's error at one place, as one: "content: Input should be a valid string or a valid list".
  return "; ".join(f"{where}: {first}" + "".join(f" or {m.removeprefix('Input should be ')}" for m in rest)
                   for where, (first, *rest) in said.items())


def _where(loc: tuple) -> str:
  """A pydantic location as a path. Union members' names ("str", "list[...]") are left out, and so is a
  part's tag, which pydantic repeats before the part's field of the same name (`audio_url.audio_url`)."""
  out = ""
  for i, x in enumerate(loc):
    if x == "body" or _member(x) or (i + 1 < len(loc) and loc[i + 1] == x):
      continue
    out += f"[{x}]" if isinstance(x, int) else f".{x}" if out else str(x)
  return out or "body"


def _member(x) -> bool:
  """Whether a location's step is a union member's name (`str`, `list[...]`), not a field or index."""
  return x == "str" or "[" in str(x)
