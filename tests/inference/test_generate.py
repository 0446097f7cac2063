"""Generation against transformers' `generate` on the tiny random checkpoints, and the decoding parts.

Greedy output must equal transformers' token for token. After a long audio prompt these random models
repeat one token forever, so the audio cases add repetition_penalty=2 (still greedy, applied on both
sides) to make the paths vary; the text cases are plain greedy. Every case stops at an eos that the
reference meets part way, so stopping and the padding after eos are compared too. Cases are chosen so
that few shapes need compiling (prompts of one bucket share a program).
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from helpers import audio_tokens, left_pad, random_features, random_prompts, random_text
from helpers.parity import assert_close
from helpers.reference import MAX_NEW, PAD, torch_generate
from flax import nnx

import af3_jax
from af3_jax.checkpoints.pretrained import read_generation_config
from af3_jax.generation import Rows, Sampling, Settings
from af3_jax.hlo import compiles
from af3_jax.inference import slots
from af3_jax.models import kv_cache

torch = pytest.importorskip("torch")


def audio_batch(rng, tiny, frames: list[int]) -> dict[str, np.ndarray]:
  """One row per audio, each a single window; shorter prompts are left padded."""
  feats, fmask = random_features(rng, frames)
  rows = [np.concatenate([random_text(rng, tiny, 4), np.full(audio_tokens(n), tiny.audio_token_id),
                          random_text(rng, tiny, 3 + i)]) for i, n in enumerate(frames)]
  return dict(left_pad(rows), input_features=feats, input_features_mask=fmask)


def single_audio(rng, tiny):
  return audio_batch(rng, tiny, [730]), 2.0


def two_audios(rng, tiny):
  """Different audio lengths; the shorter prompt is left padded."""
  return audio_batch(rng, tiny, [900, 500]), 2.0


def two_windows(rng, tiny):
  """45 s of audio in one prompt: a full window and a 15 s tail."""
  feats, fmask = random_features(rng, [3000, 1500])
  n = audio_tokens(3000) + audio_tokens(1500)
  ids = np.concatenate([random_text(rng, tiny, 4), np.full(n, tiny.audio_token_id), random_text(rng, tiny, 3)])
  return dict(left_pad([ids]), input_features=feats, input_features_mask=fmask), 2.0


def text(rng, tiny):
  return left_pad([random_text(rng, tiny, 9), random_text(rng, tiny, 5)]), None


def multi_turn(rng, tiny):
  """~150 tokens shaped like a chat: turns framed by fixed start/end/newline ids."""
  start, end, newline = tiny.vocab - 4, tiny.vocab - 3, 10
  turns = [np.concatenate([[start, 20 + i % 2, newline], random_text(rng, tiny, 24), [end, newline]])
           for i in range(5)]
  return left_pad([np.concatenate([*turns, [start, 20, newline]])]), None


CASES = {f.__name__: f for f in (single_audio, two_audios, two_windows, text, multi_turn)}


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(ckpt, loaded, case):
  batch, penalty = CASES[case](np.random.default_rng(len(case)), ckpt.tiny)
  free = torch_generate(ckpt.torch_model, batch, repetition_penalty=penalty)
  assert len(np.unique(free[0])) > 2, f"degenerate reference path {free[0]}"
  eos = int(free[0, MAX_NEW // 2])
  ref = torch_generate(ckpt.torch_model, batch, repetition_penalty=penalty, eos_token_id=eos)
  ours = af3_jax.generate(loaded, batch, MAX_NEW, do_sample=False, repetition_penalty=penalty,
                          eos_token_id=eos, pad_token_id=PAD)
  np.testing.assert_array_equal(ours, ref)


def test_batch_equals_rows_alone(ckpt, loaded):
  batch, penalty = two_audios(np.random.default_rng(len("two_audios")), ckpt.tiny)
  together = af3_jax.generate(loaded, batch, MAX_NEW, repetition_penalty=penalty)
  for i in range(2):
    real = batch["attention_mask"][i].astype(bool)
    alone = dict(input_ids=batch["input_ids"][i:i + 1, real], input_features=batch["input_features"][i:i + 1],
                 input_features_mask=batch["input_features_mask"][i:i + 1])
    np.testing.assert_array_equal(af3_jax.generate(loaded, alone, MAX_NEW, repetition_penalty=penalty)[0],
                                  together[i])


@pytest.fixture(scope="module")
def tester_loaded(tester_ckpt):
  return af3_jax.from_pretrained(tester_ckpt.hf, dtype=jnp.float32)


@pytest.mark.parametrize("extra", [0, 32])
def test_padding_is_never_audio(tester_ckpt, tester_loaded, extra):
  """transformers' tester config, where `<sound>` is id 0 (PAD): our prompts hold 0 in every padded
  position, the `extra` left pads and the bucket's (pad_token_id PAD); transformers' hold the pad id 1,
  without which it would take them for audio. Greedy tokens equal transformers', for the batch and for
  each row alone. All calls share two compiles (one row or two, length bucket 64)."""
  tester = tester_ckpt.tiny
  rows, feats, fmask = random_prompts(np.random.default_rng(32), tester, [60, 41])
  free = torch_generate(tester_ckpt.torch_model, dict(left_pad(rows, tester.pad_token_id), input_features=feats,
                                                      input_features_mask=fmask))
  assert len(np.unique(free[0])) > 2, f"degenerate reference path {free[0]}"
  eos = int(free[0, MAX_NEW // 2])
  for pick in ([0], [1], [0, 1]):
    audio = dict(input_features=feats[pick], input_features_mask=fmask[pick])
    picked = [rows[i] for i in pick]
    ref = torch_generate(tester_ckpt.torch_model, dict(left_pad(picked, tester.pad_token_id, extra), **audio),
                         eos_token_id=eos)
    ours = af3_jax.generate(tester_loaded, dict(left_pad(picked, tester.audio_token_id, extra), **audio), MAX_NEW,
                            do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(ours, ref, err_msg=f"rows {pick}")


def test_new_prompt_length_in_bucket_reuses_the_compile(gqa_ckpt):
  """Three rows run as four (one all-padding row) and give what the first two give alone."""
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  rng = np.random.default_rng(11)
  rows = [random_text(rng, gqa_ckpt.tiny, n) for n in (9, 5, 7)]
  three = af3_jax.generate(model, left_pad(rows), MAX_NEW)
  np.testing.assert_array_equal(three[:2], af3_jax.generate(model, left_pad(rows[:2]), MAX_NEW))
  longer = left_pad([np.concatenate([r, random_text(rng, gqa_ckpt.tiny, 30)]) for r in rows])
  with compiles() as compiled:
    af3_jax.generate(model, longer, MAX_NEW - 3, eos_token_id=[5, 7], pad_token_id=3)  # same buckets
  assert compiled == []


def test_stream_yields_what_generate_returns(gqa_ckpt):
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  batch, _ = text(np.random.default_rng(12), gqa_ckpt.tiny)
  full = af3_jax.generate(model, batch, MAX_NEW)
  eos = int(full[1, 3])
  expected = af3_jax.generate(model, batch, MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
  with compiles() as compiled:
    streamed = list(af3_jax.generate_stream(model, batch, MAX_NEW, eos_token_id=eos, pad_token_id=PAD))
  np.testing.assert_array_equal(np.stack(streamed, axis=1), expected)
  assert compiled.count("jit(decode_fn)") <= 1


def test_sampling_is_seeded(gqa_ckpt):
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  batch, _ = text(np.random.default_rng(13), gqa_ckpt.tiny)
  kw = dict(do_sample=True, temperature=1.5, top_k=40, top_p=0.95, repetition_penalty=1.05)
  first, again, other = (af3_jax.generate(model, batch, MAX_NEW, seed=seed, **kw) for seed in (0, 0, 1))
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()
  assert (first != af3_jax.generate(model, batch, MAX_NEW)).any()  # not greedy in disguise


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.3),
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, temperature=1.0, top_k=5),
    dict(do_sample=True, temperature=1.0, top_p=0.8),
    dict(do_sample=True, temperature=1.0, top_p=0.0),
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
], ids=str)
def test_processed_scores_match_transformers(kw):
  rng = np.random.default_rng(14)
  logits = (3 * rng.standard_normal((3, 50))).astype(np.float32)
  ids = rng.integers(0, 50, (3, 12))
  s = Sampling(**kw)
  processors = transformers.LogitsProcessorList()
  if s.repetition_penalty != 1.0:
    processors.append(transformers.RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
  if s.do_sample:
    processors.append(transformers.TemperatureLogitsWarper(s.temperature))
    if s.top_k:
      processors.append(transformers.TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
      processors.append(transformers.TopPLogitsWarper(s.top_p))
  ref = processors(torch.tensor(ids), torch.tensor(logits)).numpy()
  seen = np.zeros_like(logits, bool)
  np.put_along_axis(seen, ids, True, axis=1)
  ours = np.asarray(slots.process_logits(jnp.asarray(logits), jnp.asarray(seen), Rows.of(*[s] * len(logits))))
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  assert np.isfinite(ours).sum(-1).min() >= 1


def test_settings_come_from_the_checkpoint(tmp_path):
  (tmp_path / "config.json").write_text('{"text_config": {"eos_token_id": 7}}')
  assert read_generation_config(tmp_path).resolve() == Settings(Sampling(), (7,), 7)
  (tmp_path / "generation_config.json").write_text(
      '{"do_sample": true, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05, '
      '"eos_token_id": [5, 6], "pad_token_id": 4}')
  defaults = read_generation_config(tmp_path)
  assert defaults.resolve() == Settings(Sampling(True, 0.7, 50, 0.8, 1.05), (5, 6), 4)
  assert (defaults.resolve(do_sample=False, eos_token_id=9, pad_token_id=1)
          == Settings(Sampling(repetition_penalty=1.05), (9,), 1))
  (tmp_path / "generation_config.json").write_text('{"top_k": "many"}')
  with pytest.raises(ValueError, match="generation_config.json: a generation setting is not a number"):
    read_generation_config(tmp_path)


def test_generation_reads_no_files(gqa_ckpt, tmp_path):
  """The checkpoint's generation defaults are read at load: generating after its files are gone gives
  the same tokens, stopped at its eos and padded with its pad."""
  batch, _ = text(np.random.default_rng(14), gqa_ckpt.tiny)
  plain = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  eos = int(af3_jax.generate(plain, batch, MAX_NEW)[1, 3])
  expected = af3_jax.generate(plain, batch, MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
  folder = shutil.copytree(gqa_ckpt.hf, tmp_path / "ckpt")
  (folder / "generation_config.json").write_text(f'{{"eos_token_id": {eos}, "pad_token_id": {PAD}}}')
  model = af3_jax.from_pretrained(folder, dtype=jnp.float32)
  assert model.generation.resolve() == Settings(Sampling(), (eos,), PAD)
  shutil.rmtree(folder)
  np.testing.assert_array_equal(af3_jax.generate(model, batch, MAX_NEW), expected)


def test_bad_batches_are_errors(gqa_ckpt):
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  ids = np.ones((2, 5), np.int32)
  with pytest.raises(ValueError, match="left padding"):
    af3_jax.generate(model, dict(input_ids=ids, attention_mask=np.array([[1, 1, 1, 0, 0], [1] * 5])), 4)
  with pytest.raises(ValueError, match="unknown batch entries"):
    af3_jax.generate(model, dict(input_ids=ids, position_ids=ids), 4)


def test_cached_decode_matches_full_forward(gqa_ckpt):
  """Prefill (row 1 left padded) then one token at a time through the cache: every step's logits
  equal the full forward's at that position, within 1e-4 of the largest logit. (Audio in the prefill is
  covered by the generation tests.)"""
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  rng = np.random.default_rng(15)
  tiny = gqa_ckpt.tiny
  prompt = left_pad([random_text(rng, tiny, 21), random_text(rng, tiny, 13)])
  more = random_text(rng, tiny, 8).reshape(2, 4)
  full = np.asarray(model(input_ids=np.concatenate([prompt["input_ids"], more], 1),
                          attention_mask=np.pad(prompt["attention_mask"], ((0, 0), (0, 4)), constant_values=1)))
  positions = np.maximum(np.cumsum(prompt["attention_mask"], -1) - 1, 0)

  @jax.jit
  def cached_logits(state):  # the prefill, then each new token alone through the cache
    m = nnx.merge(model.graphdef, state)
    cache = kv_cache.init(m.cfg.decoder, 2, full.shape[1], jnp.float32)
    h, cache = m.language_model(m.embed(prompt["input_ids"]), positions,
                                prompt["attention_mask"].astype(bool), cache)
    logits = [m.lm_head(h[:, -1])]
    for i in range(4):
      h, cache = m.language_model(m.embed(more[:, i:i + 1]), positions[:, -1:] + 1 + i, jnp.ones((2, 1), bool), cache)
      logits.append(m.lm_head(h[:, 0]))
    return jnp.stack(logits, 1), cache.end

  ours, end = cached_logits(model.state)
  ref = full[:, prompt["input_ids"].shape[1] - 1:]
  assert_close(ours, ref)
  assert end.tolist() == [prompt["input_ids"].shape[1] + 4] * 2  # each row's own end
