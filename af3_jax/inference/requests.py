"""A request's life on the host: what callers submit to the engine (`engine.Engine`) (`Request`), its
checked form (`Job`, made by `jobs`, the one path from inputs to the device for the engine and
`decode.generate` alike), how several jobs become one prefill batch (`Shape`, `batch`), the `Handle` a
caller follows and the `Completion` it ends with.

A prefill batch is padded to a few shapes, each one compiled program: rows to a power of two, prompts
(right padded) to the prompt bucket of the longest (`buckets.prompt_bucket`), and the audio windows of every row, row after row,
to a window bucket (`buckets.window_bucket`) of at least one window a row, so that P clips of up to 30 s
(the common case) take the P-window program.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from af3_jax import buckets
from af3_jax.buckets import bucket, window_bucket
from af3_jax.checkpoints.pretrained import AUDIO_INPUTS as AUDIO, Model, check_inputs
from af3_jax.config import AF3Config
from af3_jax.generation import Rows, Sampling, Settings
from af3_jax.inference import slots
from af3_jax.models import whisper
from af3_jax.models.af3 import audio_embed_mask_from_features

MIN_BUCKET = 64  # the smallest prompt bucket (and `generate`'s smallest new-token bucket)


class QueueFull(Exception):
  """`submit` found `max_queue` requests already waiting for a slot: try again later (HTTP 429 or 503)."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt and how to decode it. inputs: transformers' names for one unpadded row, input_ids (n,)
  or (1, n) (an attention_mask, if given, drops padding) and with audio input_features (W, M, F),
  input_features_mask (W, F), optionally audio_embed_mask (W, P): what `Processor.collate` gives for
  one conversation. Settings left None come from the model's generation defaults, as in `generate`."""

  inputs: Mapping[str, Any]
  max_new_tokens: int
  seed: int = 0
  do_sample: bool | None = None
  temperature: float | None = None
  top_k: int | None = None
  top_p: float | None = None
  repetition_penalty: float | None = None
  eos_token_id: int | list[int] | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
  """A finished request: its new tokens (the eos that ended it included) and why it ended: "stop" (an
  eos id), "length" (max_new_tokens), "cancelled", or "error" (then `error` says what failed).
  prompt_tokens counts the prompt's audio tokens too."""

  tokens: tuple[int, ...]
  finish_reason: str
  prompt_tokens: int
  error: str | None = None

  @property
  def completion_tokens(self) -> int:
    return len(self.tokens)


@dataclasses.dataclass
class Job:
  """A prompt checked for the programs (`jobs`): its ids (n,) and audio (its own windows, fixed dtypes,
  the embed mask always given), unpadded."""

  ids: np.ndarray | None  # dropped, with the audio, once prefilled
  audio: dict[str, np.ndarray] | None
  sampling: Sampling
  seed: int  # its key is jax.random.key(seed), made in the prefill
  eos: frozenset[int]
  max_new_tokens: int
  length: int = dataclasses.field(init=False)  # the prompt's tokens, its audio tokens included
  windows: int = dataclasses.field(init=False)

  def __post_init__(self):
    self.length = len(self.ids)
    self.windows = 0 if self.audio is None else len(self.audio["input_features"])

  def drop_inputs(self) -> None:
    """Frees the prompt and audio once they are in the cache."""
    self.ids = self.audio = None

  @property
  def need(self) -> int:
    """The cache slots it fills: prompt and new tokens."""
    return self.length + self.max_new_tokens


def prepare(model: Model, request: Request, max_len: int) -> Job:
  """Checks a request on the host (its settings, then its inputs as `jobs` checks every prompt);
  ValueError says what is wrong."""
  settings = model.generation.resolve(
      do_sample=request.do_sample, temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
      repetition_penalty=request.repetition_penalty, eos_token_id=request.eos_token_id)
  inputs = dict(request.inputs)
  for name in ("input_ids", "attention_mask"):  # one row: (n,) or (1, n)
    if inputs.get(name) is not None and np.ndim(inputs[name]) == 1:
      inputs[name] = np.asarray(inputs[name])[None]
  if np.ndim(inputs.get("input_ids")) == 2 and len(inputs["input_ids"]) != 1:
    raise ValueError(f"input_ids must be one row, (n,) or (1, n); got shape {np.shape(inputs['input_ids'])}")
  (job,) = jobs(model, inputs, request.max_new_tokens, request.seed, settings, max_len)
  return job


def jobs(model: Model, inputs: Mapping[str, Any], max_new_tokens: int, seed: int, settings: Settings,
         max_len: int | None = None) -> list[Job]:
  """A batch of prompts (transformers' names, left padded) checked (`check_inputs`) and taken apart, a
  Job a row with its padding dropped; row i samples with the key of seed + i. A row's audio windows are
  those whose first frame fills one of its `<sound>` tokens: the frames fill the tokens in order, row
  after row, and a batch's jobs are prefilled together in that order (`batch`), so the prefill gets
  transformers' audio even for a window split between rows. ValueError says what is wrong."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  inputs = check_inputs(model.config, inputs, prompts=True)
  ids = inputs["input_ids"]
  mask = inputs.get("attention_mask", np.ones_like(ids)).astype(bool)
  prompts = [row[keep].astype(np.int32) for row, keep in zip(ids, mask)]
  for n in {len(p) for p in prompts}:
    if max_len is not None and n + max_new_tokens > max_len:
      raise ValueError(f"the prompt has {n} tokens; with {max_new_tokens} new tokens that is more than the "
                       f"engine's max_len of {max_len}")
  audio = [None] * len(prompts)
  if "input_features" in inputs:
    if "audio_embed_mask" not in inputs:  # one program for both prompt styles: the mask is always given
      inputs["audio_embed_mask"] = audio_embed_mask_from_features(
          inputs["input_features_mask"], whisper.tokens_per_window(model.config.encoder))
    windows = {name: np.asarray(inputs[name], dtype) for name, dtype in zip(AUDIO, (np.float32, np.int32, bool))}
    frames = windows["audio_embed_mask"].sum(-1)
    tokens = np.cumsum([(p == model.config.audio_token_id).sum() for p in prompts])
    owner = np.minimum(np.searchsorted(tokens, np.cumsum(frames) - frames, side="right"), len(prompts) - 1)
    audio = [{k: v[owner == i] for k, v in windows.items()} if (owner == i).any() else None
             for i in range(len(prompts))]
  if not -2**31 <= seed <= 2**31 - len(prompts):
    raise ValueError(f"seed must be a 32-bit integer, got {seed}")
  return [Job(p, a, settings.sampling, seed + i, frozenset(settings.eos_ids), max_new_tokens)
          for i, (p, a) in enumerate(zip(prompts, audio))]


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
  """A prefill program's shape: rows, prompt tokens (a bucket), audio windows (a bucket; 0: no audio)."""

  rows: int
  prompt: int
  windows: int

  @classmethod
  def of(cls, rows: int, longest: int, windows: int, max_len: int | None = None) -> Shape:
    """The shape that `rows` prompts of at most `longest` tokens with `windows` windows in all take."""
    rows = bucket(rows)
    return cls(rows, prompt_bucket(longest, max_len), window_bucket(max(windows, rows)) if windows else 0)

  def describe(self) -> str:
    audio = f"{self.windows} audio window{'s' * (self.windows > 1)}" if self.windows else "no audio"
    return f"{self.rows} x {self.prompt} prompt tokens, {audio}"


def prompt_bucket(n: int, max_len: int | None = None) -> int:
  """The padded length of an n-token prompt (at most max_len, if given)."""
  padded = buckets.prompt_bucket(n, MIN_BUCKET)
  return padded if max_len is None else min(padded, max_len)


def shape_of(jobs: Sequence[Job], max_len: int | None = None) -> Shape:
  return Shape.of(len(jobs), max(j.length for j in jobs), sum(j.windows for j in jobs), max_len)


def batch(jobs: Sequence[Job], shape: Shape, filler: int) -> tuple:
  """`slots.prefill_fn`'s arguments after the model (numpy): inputs, length, need, rows, seed, eos.
  Rows past the jobs are one `filler` token each (never inserted); audio windows past theirs are empty."""
  p, t = shape.rows, shape.prompt
  ids, mask = np.full((p, t), filler, np.int32), np.zeros((p, t), bool)
  mask[:, 0] = True
  for i, job in enumerate(jobs):
    ids[i, :job.length], mask[i, :job.length] = job.ids, True
  inputs = {"input_ids": ids, "attention_mask": mask}
  if shape.windows:
    audio = [job.audio for job in jobs if job.audio is not None]
    for name in AUDIO:
      x = np.concatenate([a[name] for a in audio])
      inputs[name] = np.pad(x, [(0, shape.windows - len(x))] + [(0, 0)] * (x.ndim - 1))
  extra = p - len(jobs)
  length = np.array([j.length for j in jobs] + [1] * extra, np.int32)
  need = np.array([j.need for j in jobs] + [1] * extra, np.int32)
  rows = Rows.of(*[j.sampling for j in jobs], *[Sampling()] * extra)
  seed = np.array([j.seed for j in jobs] + [0] * extra, np.int32)
  eos = np.stack([slots.eos_row(sorted(j.eos)) for j in jobs] + [slots.eos_row(())] * extra)
  return inputs, length, need, rows, seed, eos


def dummy_batch(cfg: AF3Config, shape: Shape) -> tuple:
  """`batch`'s arguments for one prompt of `shape`'s length with its windows (empty: no audio tokens),
  for compiling a prefill of that shape ahead."""
  audio = None
  if shape.windows:
    e = cfg.encoder
    audio = {"input_features": np.zeros((shape.windows, e.num_mel_bins, e.mel_frames), np.float32),
             "input_features_mask": np.zeros((shape.windows, e.mel_frames), np.int32),
             "audio_embed_mask": np.zeros((shape.windows, whisper.tokens_per_window(e)), bool)}
  filler = filler_id(cfg)
  return batch([Job(np.full(shape.prompt, filler, np.int32), audio, Sampling(), 0, frozenset(), 1)], shape, filler)


def filler_id(cfg: AF3Config) -> int:
  """A token id for padding rows: any id but the audio token's (padding never takes audio frames)."""
  return (cfg.audio_token_id + 1) % cfg.decoder.vocab_size


class Handle:
  """A submitted request. Its tokens arrive on `queue` as they are chosen, then None once it is done
  (`finish_reason` and `result()` are set by then); `listener`, if given, gets the same items, called
  from the engine's thread (or from `cancel`'s caller, for a request still waiting), so it must not
  block. Iterating a handle yields its tokens (one consumer)."""

  def __init__(self, job: Job, listener: Callable[[int | None], None] | None = None):
    self._job = job
    self.queue: queue.Queue[int | None] = queue.Queue()
    self.slot: int | None = None  # while it decodes
    self.cancelled = False
    self._listener = listener
    self._tokens: list[int] = []
    self._result: Completion | None = None
    self._done = threading.Event()

  def __iter__(self) -> Iterator[int]:
    while (token := self.queue.get()) is not None:
      yield token

  @property
  def prompt_tokens(self) -> int:
    """The prompt's tokens, its audio tokens included."""
    return self._job.length

  @property
  def done(self) -> bool:
    return self._done.is_set()

  @property
  def finish_reason(self) -> str | None:
    return self._result and self._result.finish_reason

  def result(self, timeout: float | None = None) -> Completion:
    """Waits until the request is done (TimeoutError after `timeout` seconds)."""
    if not self._done.wait(timeout):
      raise TimeoutError("the request is still running")
    return self._result

  def _put(self, item: int | None) -> None:
    self.queue.put(item)
    if self._listener is not None:
      try:
        self._listener(item)
      except Exception:  # a broken listener ends its own request, never the engine
        self._listener, self.cancelled = None, True

  def _push(self, token: int) -> None:
    self._tokens.append(token)
    self._put(token)

  def _finish(self, reason: str, error: BaseException | None = None) -> None:
    self._result = Completion(tuple(self._tokens), reason, self._job.length, None if error is None else repr(error))
    self._done.set()
    self._put(None)
