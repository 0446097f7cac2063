"""The engine's decoding batch (`inference.batch`): the decode window each dispatch reads, the programs
`warmup` compiles ahead (and that nothing compiles after them), and a decode step's memory. Requests are
checked against `af3_jax.generate` on each alone, as in test_engine.py (float32, token for token)."""

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_cases import MAX_LEN, SAMPLED, SLOTS, alone, audio_request, run, spy_windows, text_request

from af3_jax.buckets import window_bucket
from af3_jax.checkpoints.pretrained import init_random
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig
from af3_jax.hlo import compiles
from af3_jax.inference import batch as batch_module, slots
from af3_jax.inference.engine import Engine


def test_the_decode_window_follows_the_longest_live_request(gqa_ckpt, gqa_loaded, monkeypatch):
  """A long request and short ones decode together: every dispatch reads the window that holds the long
  one (256 slots); once its last tokens are dispatched the window shrinks to the short ones' bucket
  (64), also for a request that takes the long one's slot. Each gets its tokens alone."""
  rng, tiny = np.random.default_rng(4), gqa_ckpt.tiny
  monkeypatch.setattr(batch_module, "MIN_CACHE", 64)
  requests = [text_request(rng, tiny, 150, max_new=12), text_request(rng, tiny, 9, max_new=30),
              text_request(rng, tiny, 12, max_new=24, seed=5, **SAMPLED)]
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN)
  windows = spy_windows(monkeypatch)
  handles = [engine.submit(r) for r in requests]
  while not handles[0].done:
    engine.step()
  late = text_request(rng, tiny, 7, max_new=8)
  handles.append(engine.submit(late))
  done = run(engine, handles)
  long = -(-11 // engine.decode_steps)  # the dispatches for its 11 tokens after the prefill's
  assert windows == [MAX_LEN] * long + [64] * (len(windows) - long) and engine.batch.cache_len == MAX_LEN
  for i, (completion, r) in enumerate(zip(done, requests + [late])):
    assert list(completion.tokens) == alone(gqa_loaded, r), f"request {i}"


def test_warmup_compiles_each_window_bucket_once(gqa_loaded, monkeypatch):
  """Warming every audio length up to 10 minutes (0 to 20 windows) compiles each window bucket once,
  which covers every count: 14 programs a prompt bucket (powers of two: 7); a batch of 4 rows takes at
  least 4 windows. And a decode dispatch for every window, from MIN_CACHE to max_len."""
  monkeypatch.setattr(batch_module, "MIN_CACHE", 64)
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN)
  prefills, windows = [], []
  monkeypatch.setattr(engine.batch, "compile_prefill", prefills.append)
  monkeypatch.setattr(engine.batch, "compile_decode", windows.append)
  engine.warmup(prompt_lengths=[100], audio_windows=range(21), rows=[1, 3])
  assert sorted(set(prefills)) == prefills and windows == [64, 128, 256] and engine.batch.cache_len == MAX_LEN
  assert {(s.rows, s.prompt) for s in prefills} == {(1, 128), (4, 128)}
  assert [s.windows for s in prefills if s.rows == 1] == [0] + sorted({window_bucket(n) for n in range(1, 21)})
  assert [s.windows for s in prefills if s.rows == 4] == [0, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20]


def test_nothing_compiles_once_warm(monkeypatch):
  """A model of its own, so that only this test's `warmup` compiles its programs, whatever ran before:
  `warmup` compiles them without running anything, and then requests of mixed lengths, windows,
  settings, seeds and eos ids, some arriving while others decode and some prefilled together, compile
  nothing (XLA's compile events), though the decode window changes as they come and go (buckets from
  128: windows 128 and 256). Warmed: prompt bucket 256 with no audio, one window and three, in batches
  of 1, 2 and 4 rows (a batch takes at least a window a row), and bucket 64 with no audio."""
  monkeypatch.setattr(batch_module, "MIN_CACHE", 128)
  cfg = AF3Config(encoder=EncoderConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                  decoder=DecoderConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                        head_dim=16, intermediate_size=64),
                  audio_token_id=127)
  tiny = SimpleNamespace(audio_token_id=cfg.audio_token_id)
  engine = Engine(init_random(cfg, dtype=jnp.float32), max_slots=SLOTS, max_len=MAX_LEN)
  with compiles() as warming:
    engine.warmup(prompt_lengths=[200], audio_windows=[0, 1, 3], rows=[1, 2, 4])
    engine.warmup(prompt_lengths=[20], rows=[1, 2])
  assert {f"jit({name})" for name in ("prefill_fn", "choose_fn", "insert_fn", "decode_fn")} <= set(warming)
  rng = np.random.default_rng(2)
  first = [audio_request(rng, tiny, 700, max_new=8), text_request(rng, tiny, 240, max_new=6, seed=3, **SAMPLED),
           text_request(rng, tiny, 150, max_new=5, eos_token_id=[5, 6, 7, 8, 9], repetition_penalty=1.3)]
  later = [audio_request(rng, tiny, 900, max_new=4, seed=4, do_sample=True), text_request(rng, tiny, 130, max_new=3),
           audio_request(rng, tiny, 200, max_new=4, windows=3), text_request(rng, tiny, 20, max_new=24)]
  windows = spy_windows(monkeypatch)
  with compiles() as serving:
    handles = [engine.submit(r) for r in first]
    engine.step()
    handles += [engine.submit(r) for r in later]
    done = run(engine, handles)
  assert serving == [] and set(windows) == {128, 256}
  assert all(c.finish_reason in ("stop", "length") and c.tokens for c in done)


@pytest.mark.parametrize("steps", [1, 8], ids=["one step", "a loop of 8"])
def test_the_decode_step_writes_the_cache_in_place(gqa_loaded, steps):
  """A dispatch of one step, or of several carrying the cache through its loop (`--num-scheduler-steps`).
  The step's temporaries stay under the size of the cache, which it updates where it lies (the carried
  cache); rebuilding it per layer, as scan outputs do, needs at least a whole copy. Reading a window of
  512 of its 8192 slots, they stay under the size of a 512-slot cache: each layer's attention reads a
  512-slot slice, and the only arrays as long as the cache are the cache itself (its k and v, written in
  place by a scatter, and its key mask)."""
  engine = Engine(gqa_loaded, max_slots=SLOTS)
  length, window = 8192, 512
  state = jax.eval_shape(lambda: slots.empty_fn(gqa_loaded.config, batch=SLOTS, length=length,
                                                dtype=engine.batch.dtype))
  k = state.cache.k
  for w in (length, window):
    with jax.set_mesh(gqa_loaded.mesh):
      compiled = slots.decode_fn.lower(gqa_loaded.graphdef, gqa_loaded.state, state, np.ones(SLOTS, np.int32),
                                       window=w, steps=steps).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < k.size * k.dtype.itemsize * 2 * w // length
  layers, b, _, kv, h = k.shape
  hlo = compiled.as_text()
  assert re.search(rf"= f32\[1,{b},{window},{kv},{h}\]\S* dynamic-slice\(", hlo)
  long = set(re.findall(rf"\b\w+\[[\d,]*\b{length}\b[\d,]*\]", hlo))
  assert long == {f"f32[{layers},{b},{length},{kv},{h}]", f"pred[{b},{length}]"}, long
  assert not re.search(rf"= f32\[{layers},{b},{length},{kv},{h}\]\S* copy\(", hlo)
