"""OpenAI requests into engine requests: messages into our processor's conversation (each audio part
decoded to a waveform), the sampling parameters into `engine.Request`'s, as vLLM reads them.

Settings a request leaves out come from the checkpoint's `generation_config.json` (vLLM's
`--generation-config auto`); temperature 0 is greedy; max_tokens defaults to what the context leaves.
A sampled request without a seed draws a fresh one, so two such requests differ, as OpenAI's do.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import numpy as np

from af3_jax.audio import features
from af3_jax.data.processor import ASR_PROMPT, Processor
from af3_jax.inference.engine import Request
from af3_jax.serving import media
from af3_jax.serving.protocol import ChatRequest, InputAudioPart, SEED_LIMIT, TextPart

# A transcription's most new tokens per 30 s window of audio: Whisper's decoder limit for a window (its
# max_target_positions), about four times what the fastest speech needs, so a model that never says its
# eos stops in proportion to the audio rather than at the end of the context.
TRANSCRIPT_TOKENS = 448


@dataclasses.dataclass(frozen=True)
class Translator:
  """What turning a request into the engine's needs: the processor, think mode, the engine's context
  (`max_len`: prompt plus new tokens) and the folder local audio files may come from (None: none)."""

  processor: Processor
  max_len: int
  think: bool = False
  media_root: Path | None = None

  def chat(self, body: ChatRequest) -> Request:
    """The engine request for a chat completion; ValueError says what in the body is wrong."""
    conversation = [{"role": m.role, "content": self._content(m.content, f"messages[{i}]")}
                    for i, m in enumerate(body.messages)]
    sampling = {}
    if body.temperature == 0:
      sampling["do_sample"] = False
    elif body.temperature is not None:
      sampling |= {"do_sample": True, "temperature": body.temperature}
    if body.top_p is not None:
      sampling["top_p"] = body.top_p
    if body.top_k is not None:
      sampling["top_k"] = max(body.top_k, 0)  # vLLM's -1 is transformers' 0: off
    if body.repetition_penalty is not None:
      sampling["repetition_penalty"] = body.repetition_penalty
    seed = body.seed if body.seed is not None else secrets.randbelow(SEED_LIMIT)
    return self._request(conversation, body.max_completion_tokens or body.max_tokens, seed=seed, **sampling)

  def transcription(self, audio: bytes, filename: str, temperature: float) -> Request:
    """The engine request for a transcription of an uploaded file: the prompt `infer.py` and the ASR
    evaluation use, greedy at temperature 0 (OpenAI's default for transcriptions), at most
    TRANSCRIPT_TOKENS new tokens a window of audio."""
    suffix = Path(filename).suffix.lower().lstrip(".")
    wave = media.from_bytes(audio, suffix if suffix in media.FORMATS else "", "file", self.processor.style,
                            self._max_seconds)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": ASR_PROMPT}]}]
    sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    return self._request(conversation, None, seed=secrets.randbelow(SEED_LIMIT), per_window=TRANSCRIPT_TOKENS,
                         **sampling)

  def _content(self, content, where: str) -> list[dict]:
    if isinstance(content, str):
      return [_text(content, f"{where}.content")]
    return [self._part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]

  def _part(self, part, where: str) -> dict:
    style = self.processor.style
    if isinstance(part, TextPart):
      return _text(part.text, where)
    if isinstance(part, InputAudioPart):
      if part.input_audio.data.startswith("data:"):
        raise ValueError(f"{where}: input_audio.data takes bare base64; send a data: URL as an audio_url part")
      wave = media.from_base64(part.input_audio.data, part.input_audio.format, where, style, self._max_seconds)
    else:
      wave = media.from_url(part.audio_url.url, where, style, self.media_root, self._max_seconds)
    return {"type": "audio", "audio": wave}

  @property
  def _max_seconds(self) -> int:
    """The longest audio the processor keeps whole (10 minutes for AF3, 20 for Music Flamingo)."""
    return self.processor.max_windows * features.WINDOW_SAMPLES // features.SAMPLE_RATE

  def _request(self, conversation: list[dict], max_tokens: int | None, per_window: int | None = None,
               **settings) -> Request:
    """The engine request; new tokens: `max_tokens`, else what the context leaves, at most `per_window`
    for each 30 s window of audio when given."""
    encoded = self.processor.encode(conversation, think=self.think)
    inputs = self.processor.collate([encoded])
    windows = len(inputs.get("input_features", ()))
    if windows > self.processor.max_windows:
      raise ValueError(f"the request's audio fills {windows} windows of 30 s; the model takes at most "
                       f"{self.processor.max_windows} ({self._max_seconds // 60} minutes) per request")
    n = len(encoded.ids)
    if n >= self.max_len:
      raise ValueError(f"the prompt has {n} tokens (audio included), which fills the server's context of "
                       f"{self.max_len} tokens")
    if max_tokens is not None and n + max_tokens > self.max_len:
      raise ValueError(f"max_tokens (or max_completion_tokens) is {max_tokens}, but the prompt has {n} tokens "
                       f"(audio included) and the server's context is {self.max_len}, which leaves {self.max_len - n}")
    if max_tokens is None:
      max_tokens = self.max_len - n if per_window is None else min(self.max_len - n, per_window * max(windows, 1))
    return Request({k: np.asarray(v) for k, v in inputs.items()}, max_tokens, **settings)


def _text(text: str, where: str) -> dict:
  """A text part; JSON can spell a lone surrogate ("\\ud800"), which no tokenizer takes."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{where}: the text is not valid Unicode (a lone surrogate at character {e.start})") from None
  return {"type": "text", "text": text}
