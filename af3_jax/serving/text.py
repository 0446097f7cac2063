"""One answer's text as its tokens arrive, with stop strings: the engine leaves them to the caller."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Answer:
  """Turns tokens into text pieces to send. Each token is detokenized once (tokenizers' DecodeStream:
  linear in the answer, never half a character). Text that could be the start of a stop string is held
  back until it cannot be; once a stop string appears, the answer ends before it (`stopped`), and the
  caller cancels the request. The pieces a caller gets from `add` and then `finish` are the whole
  answer, streamed or not."""

  def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
    self._tokenizer = tokenizer
    self._stream = DecodeStream(skip_special_tokens=True)
    self._stop = [s for s in stop if s]
    self._hold = max(map(len, self._stop), default=1) - 1  # a stop string's longest proper prefix
    self._ids: list[int] = []
    self._text = ""  # decoded so far
    self._sent = 0  # of which handed out
    self.stopped = False

  @property
  def tokens(self) -> int:
    """The tokens taken so far: the answer's completion tokens (up to the one that ended a stop string)."""
    return len(self._ids)

  def add(self, token: int) -> str:
    """Takes the next token; returns the text that can be sent now (maybe "")."""
    self._ids.append(token)
    self._text += self._stream.step(self._tokenizer, token) or ""
    # A stop string cannot start in text already sent: that text was checked with `_hold` more after it.
    found = [i for i in (self._text.find(s, self._sent) for s in self._stop) if i >= 0]
    if found:
      self.stopped = True
      return self._release(min(found))
    return self._release(max(len(self._text) - self._hold, self._sent))

  def finish(self) -> str:
    """The rest, once no token follows: the held-back text, and what a final full decode adds (a
    character cut off by the end, which the stream holds back, comes out as the decoder shows it)."""
    if self.stopped:
      return ""
    full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
    if full.startswith(self._text):
      self._text = full
    return self._release(len(self._text))

  def _release(self, end: int) -> str:
    piece, self._sent = self._text[self._sent:end], end
    return piece
