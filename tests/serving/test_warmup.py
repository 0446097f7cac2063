"""The server's warm-up (`serving/warmup.py`): what it compiles before answering and what in the background,
from the engine's own buckets, and the lines it logs for each phase (compiling is stubbed out here;
tests/inference/test_batch.py shows that compiling ahead leaves nothing to compile while serving)."""

import logging

import pytest

from af3_jax.inference import requests
from af3_jax.inference.batch import DecodeBatch
from af3_jax.inference.engine import Engine, Shape
from af3_jax.models import whisper
from af3_jax.serving import warmup

uvicorn = pytest.importorskip("uvicorn")  # the serving extra
from af3_jax.serving.service import Service  # noqa: E402


def shapes(programs) -> list[Shape]:
  return [p.compile.args[0] for p in programs if p.name.startswith("prefill")]


def windows(programs) -> list[int]:
  return [p.compile.args[0] for p in programs if p.name.startswith("decode")]


def test_common_shapes_first_then_every_other(gqa_loaded):
  """At the model's whole context (32,768): a question and a 30 s clip, with the decode windows of a
  250-token answer to it, before serving; afterwards every prompt bucket with no audio and with one
  window, several clips prefilled at once, every other decode window and long audio, each once."""
  engine = Engine(gqa_loaded, max_slots=8)
  plan = warmup.plan(engine)
  clip = whisper.tokens_per_window(gqa_loaded.config.encoder) + warmup.QUESTION_TOKENS
  one_clip = requests.prompt_bucket(clip, engine.max_len)  # 832 tokens (buckets.prompt_bucket)
  assert shapes(plan.now) == [Shape(1, 64, 0), Shape(1, one_clip, 1)] and windows(plan.now) == [1024, 2048]
  later = shapes(plan.later)
  assert len(set(later)) == len(later) and not set(later) & set(shapes(plan.now))
  buckets = {requests.prompt_bucket(n, engine.max_len) for n in range(1, engine.max_len + 1)}
  assert {(s.prompt, s.windows) for s in later + shapes(plan.now) if s.rows == 1} >= {(t, w) for t in buckets
                                                                                      for w in (0, 1)}
  assert {s for s in later if s.rows > 1} == {Shape(r, t, w) for r in (2, 4, 8) for t, w in ((one_clip, r), (64, 0))}
  assert windows(plan.now) + windows(plan.later) == engine.batch.decode_windows()
  ten_minutes = 20 * whisper.tokens_per_window(gqa_loaded.config.encoder) + warmup.QUESTION_TOKENS
  assert Shape(1, requests.prompt_bucket(ten_minutes, engine.max_len), 20) in later


def test_the_plan_follows_the_buckets(gqa_loaded, monkeypatch):
  """Finer prompt buckets (multiples of 64 up to 512, then powers of two) give a plan over those."""
  monkeypatch.setattr(requests, "prompt_bucket", lambda n, limit: min(-(-n // 64) * 64 if n <= 512 else
                                                                     1 << (n - 1).bit_length(), limit))
  engine = Engine(gqa_loaded, max_slots=2, max_len=2048)
  plan = warmup.plan(engine)
  no_audio = sorted(s.prompt for s in shapes(plan.now + plan.later) if s.rows == 1 and s.windows == 0)
  assert no_audio == [64, 128, 192, 256, 320, 384, 448, 512, 1024, 2048]


def test_each_phase_is_a_line(gqa_ckpt, tokenizer_dir, gqa_loaded, monkeypatch, caplog):
  """Service.start says what it compiles, a line per program before it serves, how many follow in the
  background and that --max-model-len shortens them; the background says how far it got."""
  from af3_jax.data.processor import Processor

  compiled = []
  monkeypatch.setattr(DecodeBatch, "compile_prefill", lambda self, shape: compiled.append(shape))
  monkeypatch.setattr(DecodeBatch, "compile_decode", lambda self, window: compiled.append(window))
  processor = Processor.from_pretrained(tokenizer_dir, style="hf")
  with caplog.at_level(logging.INFO, logger="uvicorn.error"):
    service = Service.start(gqa_loaded, processor, max_slots=2)
    assert service.warming.join(timeout=60)
    service.stop()
  lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
  plan = warmup.plan(service.engine)
  now, later = len(plan.now), len(plan.later)
  assert lines[0].startswith(f"warm-up: compiling {now} programs for common requests")
  assert [x.split(":")[0] for x in lines[1:now + 1]] == [f"warm-up {i}/{now}" for i in range(1, now + 1)]
  assert lines[1].endswith(" s)") and "prefill 1 x 64 prompt tokens, no audio" in lines[1]
  assert f"; {later} more programs compile in the background" in lines[now + 1]
  assert "--max-model-len shortens it (the context now is the model's, 32768 tokens)" in lines[now + 1]
  progress = [x for x in lines if x.startswith("background warm-up:")]
  assert 5 <= len(progress) <= 10 and progress[-1].startswith(f"background warm-up: {later}/{later} programs")
  assert len(compiled) == now + later
