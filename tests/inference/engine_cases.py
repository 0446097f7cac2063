"""Requests for the engine's tests, and `generate`'s answer to each alone, which the engine must give."""

import numpy as np
from helpers import audio_tokens, random_features, random_text

import af3_jax
from af3_jax.inference import slots
from af3_jax.inference.engine import Request

SLOTS, MAX_LEN = 3, 256  # shared by the engines of all these tests, so that they share compiled programs
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)


def text_request(rng, tiny, n, max_new=16, **kw):
  return Request({"input_ids": random_text(rng, tiny, n)}, max_new, **kw)


def audio_request(rng, tiny, frames, max_new=16, windows=1, **kw):
  """`windows` windows of `frames` mel frames each between a few text tokens, repetition_penalty 2."""
  feats, mask = random_features(rng, [frames] * windows)
  ids = np.concatenate([random_text(rng, tiny, 4), np.full(windows * audio_tokens(frames), tiny.audio_token_id),
                        random_text(rng, tiny, 3)])
  return Request({"input_ids": ids, "input_features": feats, "input_features_mask": mask}, max_new,
                 repetition_penalty=2.0, **kw)


def alone(model, r: Request) -> list[int]:
  """`generate` on the request by itself: its tokens up to its eos or max_new_tokens."""
  batch = {k: (v[None] if k == "input_ids" else v) for k, v in r.inputs.items()}
  settings = dict(do_sample=r.do_sample, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                  repetition_penalty=r.repetition_penalty, eos_token_id=r.eos_token_id)
  return af3_jax.generate(model, batch, r.max_new_tokens, seed=r.seed, **settings)[0].tolist()


def run(engine, handles):
  while not all(h.done for h in handles):
    engine.step()
  return [h.result() for h in handles]


def spy_windows(monkeypatch) -> list[int]:
  """The window of every decode dispatch the engine runs from now on, in order."""
  windows, decode = [], slots.decode_fn

  def spy(*args, window, steps):
    windows.append(window)
    return decode(*args, window=window, steps=steps)

  monkeypatch.setattr(slots, "decode_fn", spy)
  return windows
