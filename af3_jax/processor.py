"""Processor: conversations of HF-style messages -> the arrays `af3_jax.Model` takes.

Two prompt styles (docs/upstream.md#prompt-format):
  "hf"      token-identical to transformers' `AudioFlamingo3Processor`: one `<sound>` before the message's
            text (no newline), expanded to the audio's exact number of frames.
  "nvidia"  the pipeline AF3 was trained with: one `<sound>` per 30 s window, each followed by "\\n";
            per-window counts rounded to multiples of 10 (Python `round`, ties to even), which may take
            frames from the padded region; `audio_embed_mask` selects them. Messages are stripped.
Beyond transformers, both styles take several audios per message and audios in several turns
(AF3-Chat); `<sound-k>` tags in the text place the k-th audio of the conversation (1-based, repeated
tags repeat the audio); without tags a message's audios go before its text, in order.

A checkpoint's family (`FAMILIES`, from its config.json's model_type) sets the default system prompt,
the longest audio, and for Music Flamingo the `<|sound_bos|>` / `<|sound_eos|>` tokens around every
audio's `<sound>` run (`MusicFlamingoProcessor`; hf style only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from af3_jax import weights
from af3_jax.audio import features
from af3_jax.audio.loading import load_audio
from af3_jax.data.manifest import SOUND_TAG
from af3_jax.models.whisper import pooled_lengths
from af3_jax.train_step import IGNORE  # the label the loss skips

STYLES = ("hf", "nvidia")
SYSTEM_PROMPT = "You are a helpful assistant."
ASR_PROMPT = "Transcribe the input speech."  # transformers' AF3 processor default for transcription
THINK_SUFFIX = "\nPlease think and reason about the input audio before you respond."
TOKENS_PER_WINDOW = int(pooled_lengths(features.FRAMES))  # audio tokens of a full window (750)
# The default system turn of Music Flamingo's chat template (transformers' convert_musicflamingo_to_hf.py),
# typos and the missing space before "--" included: it is what the model was prompted with.
MUSIC_SYSTEM_PROMPT = (
    "You are Music Flamingo, a multimodal assistant for language and music. On each turn you receive an audio "
    "clip which contains music and optional text, you will receive at least one or both; use your world "
    "knowledge and reasoning to help the user with any task. Interpret the entirety of the content any input "
    "music--regardlenss of whether the user calls it audio, music, or sound.")


@dataclasses.dataclass(frozen=True)
class Family:
  """What a model family's processor puts around the model: the prompt styles it takes (the first is the
  one it was trained with), the system turn a conversation without one gets, the most 30 s windows an
  audio keeps (`max_audio_len` upstream), and the tokens that frame each audio's `<sound>` run (none for
  AF3)."""

  styles: tuple[str, ...]
  system_prompt: str
  max_windows: int
  audio_bos: str | None = None
  audio_eos: str | None = None


FAMILIES = {  # by config.json's model_type
    "audioflamingo3": Family(("nvidia", "hf"), SYSTEM_PROMPT, features.MAX_WINDOWS),  # AudioFlamingo3Processor: 600 s
    # MusicFlamingoProcessor: 1,200 s; its prompts are the only ones known for it.
    "musicflamingo": Family(("hf",), MUSIC_SYSTEM_PROMPT, 40, "<|sound_bos|>", "<|sound_eos|>"),
}


@dataclasses.dataclass(frozen=True)
class _Audio:
  """One audio placed in the prompt: its windows' features and the frames each window contributes."""

  features: np.ndarray  # (W, 128, 3000)
  features_mask: np.ndarray  # (W, 3000)
  frames: tuple[int, ...]  # frames used per window


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One conversation, tokenized: ids and labels (unpadded) and its audios in prompt order."""

  ids: list[int]
  labels: list[int]
  audios: list[_Audio]


class Processor:
  """Tokenizer + audio features + chat template, for one prompt style."""

  def __init__(self, tokenizer, *, style: str | None = "hf", family: str = "audioflamingo3",
               max_windows: int | None = None, audio_token: str = "<sound>"):
    """style None: the one the family was trained with (nvidia for AF3, hf for Music Flamingo);
    max_windows None: the family's."""
    if family not in FAMILIES:
      raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    self.family = FAMILIES[family]
    style = self.family.styles[0] if style is None else style
    if style not in STYLES:
      raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if style not in self.family.styles:
      raise ValueError(f"{family} takes the {' or '.join(self.family.styles)} prompt style, not {style!r}")
    self.tokenizer = tokenizer
    self.style = style
    self.max_windows = self.family.max_windows if max_windows is None else max_windows
    self.audio_token = audio_token
    self.audio_token_id = self._token_id(audio_token)
    for token in (self.family.audio_bos, self.family.audio_eos):
      if token is not None:
        self._token_id(token)

  def _token_id(self, token: str) -> int:
    """The id of a token the prompts need; a ValueError naming the tokenizer's folder if it has none."""
    token_id = self.tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == self.tokenizer.unk_token_id:
      where = getattr(self.tokenizer, "name_or_path", "")  # the folder it was loaded from, if any
      raise ValueError(f"{where + ': ' if where else ''}the tokenizer has no {token} token")
    return token_id

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | Path, **kwargs) -> Processor:
    """The checkpoint's tokenizer (`llm/` in the NVIDIA layout) through transformers' AutoTokenizer, for
    the family its config.json names (AF3 without one). Missing or unreadable tokenizer files are a
    one-line ValueError naming the folder."""
    root = weights.resolve(path_or_hub_id)
    kwargs.setdefault("family", weights.model_type(root))
    return cls(_load_tokenizer(weights.tokenizer_dir(root)), **kwargs)

  def apply_chat_template(self, conversations, add_generation_prompt: bool = True, *, think: bool = False,
                          return_labels: bool = False) -> dict[str, np.ndarray]:
    """One conversation (a list of messages) or a batch of them -> numpy model inputs.

    Returns input_ids and attention_mask (batch, seq), left padded; with audio, input_features
    (windows, 128, 3000), input_features_mask (windows, 3000) and, for style "nvidia",
    audio_embed_mask (windows, 750); with `return_labels`, labels (batch, seq) that supervise only
    assistant content and its closing `<|im_end|>` (upstream training masking), -100 elsewhere.
    """
    if conversations and isinstance(conversations[0], dict):
      conversations = [conversations]
    return self.collate([self.encode(c, add_generation_prompt, think=think) for c in conversations],
                        return_labels=return_labels)

  def encode(self, conversation, add_generation_prompt: bool = True, *, think: bool = False) -> Encoded:
    """One conversation -> its unpadded tokens, labels and audio (what `collate` batches)."""
    text, spans, audios = self._render(conversation, add_generation_prompt, think)
    ids, labels = self._tokenize(text, spans)
    return Encoded(ids, labels, audios)

  def collate(self, samples: Sequence[Encoded], *, return_labels: bool = False) -> dict[str, np.ndarray]:
    """Left-pads encoded samples into one batch; their audio windows follow in batch order."""
    width = max(len(s.ids) for s in samples)
    pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    left = lambda x, value: np.pad(np.asarray(x, np.int32), (width - len(x), 0), constant_values=value)
    out = {"input_ids": np.stack([left(s.ids, pad) for s in samples]),
           "attention_mask": np.stack([left(np.ones(len(s.ids)), 0) for s in samples])}
    if return_labels:
      out["labels"] = np.stack([left(s.labels, IGNORE) for s in samples])
    audios = [a for s in samples for a in s.audios]
    if audios:
      out["input_features"] = np.concatenate([a.features for a in audios])
      out["input_features_mask"] = np.concatenate([a.features_mask for a in audios])
      if self.style == "nvidia":
        used = np.concatenate([a.frames for a in audios])
        out["audio_embed_mask"] = np.arange(TOKENS_PER_WINDOW)[None, :] < used[:, None]
    return out

  def _render(self, conversation, add_generation_prompt: bool, think: bool):
    """(prompt text with audio tokens expanded, assistant content spans, audios in prompt order)."""
    messages = [_check_message(m, i) for i, m in enumerate(conversation)]
    audio_items = [item for m in messages for item in m["content"] if item["type"] == "audio"]
    tagged = any(SOUND_TAG.search(item["text"]) for m in messages for item in m["content"] if item["type"] == "text")
    loaded = {}

    def audio(k: int) -> _Audio:  # 1-based, loaded once even when a tag repeats
      if not 1 <= k <= len(audio_items):
        raise ValueError(f"<sound-{k}> but the conversation has {len(audio_items)} audio(s)")
      if k not in loaded:
        loaded[k] = self._features(audio_items[k - 1])
      return loaded[k]

    if think:
      last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
      messages[last_user] = {**messages[last_user],
                             "content": [*messages[last_user]["content"], {"type": "text", "text": THINK_SUFFIX}]}
    if messages[0]["role"] != "system":
      messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.family.system_prompt}]})
    text, spans, placed, seen = "", [], [], 0
    for m in messages:
      body = "".join(item["text"] for item in m["content"] if item["type"] == "text")
      n_audio = sum(item["type"] == "audio" for item in m["content"])
      if self.style == "nvidia":
        body = body.strip()
      if tagged:
        pieces = SOUND_TAG.split(body)  # text, k, text, k, ..., text
        order = [audio(int(k)) for k in pieces[1::2]]
        body = "".join(p if i % 2 == 0 else self._placeholder(order[i // 2]) for i, p in enumerate(pieces))
      else:
        order = [audio(seen + j + 1) for j in range(n_audio)]
        body = self._leading_placeholders(order) + body
      seen += n_audio
      placed += order
      head = f"<|im_start|>{m['role']}\n"
      if m["role"] == "assistant":
        spans.append((len(text) + len(head), len(text) + len(head) + len(body) + len("<|im_end|>")))
      text += f"{head}{body}<|im_end|>\n"
    if add_generation_prompt:
      text += "<|im_start|>assistant\n"
    return text, spans, placed

  def _placeholder(self, a: _Audio) -> str:
    """The expanded audio tokens for one placement of an audio."""
    if self.style == "hf":
      return (self.family.audio_bos or "") + self.audio_token * sum(a.frames) + (self.family.audio_eos or "")
    return "\n".join(self.audio_token * n for n in a.frames)  # NVIDIA: ("<sound>\n" * W).rstrip()

  def _leading_placeholders(self, audios: Sequence[_Audio]) -> str:
    if self.style == "hf":  # transformers' template: audio before the text, no separator
      return "".join(self._placeholder(a) for a in audios)
    return "".join(self._placeholder(a) + "\n" for a in audios)  # NVIDIA: "<sound>\n" * W + question

  def _features(self, item: dict[str, Any]) -> _Audio:
    if "audio" in item:  # arrays are used as given (16 kHz mono float), as transformers does
      wave = np.asarray(item["audio"], np.float32)
      if wave.ndim != 1:
        raise ValueError(f"audio arrays must be 1-D (mono, 16 kHz), got shape {wave.shape}")
    else:
      # transformers reads whole files and the window cap cuts them; NVIDIA reads only what fits.
      limit = 30.0 * self.max_windows if self.style == "nvidia" else None
      wave = load_audio(item["path"], max_seconds=limit, style=self.style)
    feats, mask, _ = features.extract_features([wave], max_windows=self.max_windows)
    exact = np.maximum(pooled_lengths(mask.sum(-1)), 0)
    frames = exact if self.style == "hf" else np.array([round(k / 10) * 10 for k in exact.tolist()])
    return _Audio(feats, mask, tuple(int(n) for n in frames))

  def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids and labels; a token is supervised when it starts inside an assistant span."""
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(spans))
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for i, (start, _) in enumerate(enc.get("offset_mapping") or []):
      if any(lo <= start < hi for lo, hi in spans) and ids[i] != self.audio_token_id:
        labels[i] = ids[i]
    return ids, labels


def _load_tokenizer(folder: Path):
  """AutoTokenizer of `folder`, which must hold Qwen2's files: tokenizer.json, or vocab.json + merges.txt."""
  from transformers import AutoTokenizer

  missing = [f for f in ("tokenizer.json", "vocab.json", "merges.txt") if not (folder / f).is_file()]
  if "tokenizer.json" in missing and len(missing) > 1:
    # Without them AutoTokenizer still builds a tokenizer, an empty one, and nothing says why.
    raise ValueError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt, are needed; "
                     f"missing: {', '.join(missing)})")
  try:
    return AutoTokenizer.from_pretrained(folder)
  except Exception as e:  # a damaged file surfaces as whatever tokenizers or transformers raise (JSON, type errors)
    raise ValueError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _check_message(m: Any, index: int) -> dict[str, Any]:
  """A message with its content as a list of {"type": "text"|"audio", ...} items."""
  if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
    raise ValueError(f"message {index}: needs a role of system/user/assistant, got {m!r:.80}")
  content = m.get("content")
  if isinstance(content, str):
    content = [{"type": "text", "text": content}]
  if not isinstance(content, list):
    raise ValueError(f"message {index}: content must be a string or a list of items")
  for item in content:
    kind = item.get("type") if isinstance(item, dict) else None
    if kind == "text" and isinstance(item.get("text"), str):
      continue
    if kind == "audio" and ("path" in item or "audio" in item):
      continue
    raise ValueError(f"message {index}: items are {{'type': 'text', 'text': ...}} or "
                     f"{{'type': 'audio', 'path'|'audio': ...}}, got {item!r:.80}")
  return {"role": m["role"], "content": content}
