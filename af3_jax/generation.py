"""Decoding settings: a checkpoint's generation defaults (`GenerationConfig`, read once by
`from_pretrained`), combined with a call's arguments into the `Settings` that a request decodes with,
whose `Sampling` the device takes as per-row arrays (`Rows`).

transformers' meanings and defaults: greedy unless do_sample; when sampling, temperature 1, top_k 50,
top_p 1; repetition_penalty 1.0, top_k 0 and top_p 1.0 are off. pad falls back to the first eos id.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one request's next token is chosen (the device takes it as data, `Rows`)."""

  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    if self.temperature <= 0 or self.top_k < 0 or not 0 <= self.top_p <= 1 or self.repetition_penalty <= 0:
      raise ValueError(f"invalid sampling settings {self}: need temperature > 0, top_k >= 0, 0 <= top_p <= 1, "
                       "repetition_penalty > 0")


@struct.dataclass
class Rows:
  """Each row's `Sampling`, (B,) each, so that rows of any settings share one program: do_sample bool;
  temperature; top_k (0: off); tail, the mass top-p drops (1 - top_p; 0: off); repetition_penalty (1: off)."""

  do_sample: jax.Array
  temperature: jax.Array
  top_k: jax.Array
  tail: jax.Array
  repetition_penalty: jax.Array

  @classmethod
  def of(cls, *rows: Sampling) -> Rows:
    """A row for each Sampling, in numpy (1 - top_p taken in Python's float64, then float32, as
    transformers' TopPLogitsWarper compares it)."""
    return cls(np.array([s.do_sample for s in rows], bool), np.array([s.temperature for s in rows], np.float32),
               np.array([s.top_k for s in rows], np.int32), np.array([1 - s.top_p for s in rows], np.float32),
               np.array([s.repetition_penalty for s in rows], np.float32))


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one request decodes with."""

  sampling: Sampling
  eos_ids: tuple[int, ...]  # empty: only max_new_tokens stops
  pad_id: int


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """A model's generation defaults: `generation_config.json`'s fields (None where it sets none), eos
  from the model's config.json when that file names none."""

  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  do_sample: bool | None = None
  temperature: float | None = None
  top_k: int | None = None
  top_p: float | None = None
  repetition_penalty: float | None = None

  @classmethod
  def from_dict(cls, gen: dict, config_eos=None) -> GenerationConfig:
    """From generation_config.json's object (unknown keys ignored); raises ValueError for a bad value."""
    eos = gen.get("eos_token_id")
    eos = config_eos if eos is None else eos
    try:
      return cls(eos_token_id=_ids(eos), pad_token_id=_maybe(int, gen.get("pad_token_id")),
                 do_sample=_maybe(bool, gen.get("do_sample")), temperature=_maybe(float, gen.get("temperature")),
                 top_k=_maybe(int, gen.get("top_k")), top_p=_maybe(float, gen.get("top_p")),
                 repetition_penalty=_maybe(float, gen.get("repetition_penalty")))
    except (TypeError, ValueError) as e:
      raise ValueError(f"a generation setting is not a number ({e})") from None

  def resolve(self, *, do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
              top_p: float | None = None, repetition_penalty: float | None = None,
              eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> Settings:
    """These defaults with a call's arguments on top (None: the default)."""
    pick = lambda value, default, fallback: next((v for v in (value, default, fallback) if v is not None), None)
    eos = _ids(eos_token_id) if eos_token_id is not None else self.eos_token_id
    pad = int(pick(pad_token_id, self.pad_token_id, eos[0] if eos else 0))
    penalty = float(pick(repetition_penalty, self.repetition_penalty, 1.0))
    if not pick(do_sample, self.do_sample, False):  # greedy: the warpers are unused, their defaults kept
      return Settings(Sampling(repetition_penalty=penalty), eos, pad)
    sampling = Sampling(True, float(pick(temperature, self.temperature, 1.0)), int(pick(top_k, self.top_k, 50)),
                        float(pick(top_p, self.top_p, 1.0)), penalty)
    return Settings(sampling, eos, pad)


def _maybe(kind, value):
  return None if value is None else kind(value)


def _ids(value) -> tuple[int, ...]:
  """One id or a list of them (transformers allows both) -> a tuple; None -> ()."""
  if value is None:
    return ()
  return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
