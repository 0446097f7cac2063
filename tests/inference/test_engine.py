"""The continuous-batching engine against `af3_jax.generate` on the tiny checkpoint (float32).

Requests arrive staggered (some while others decode), with audio and without, of different lengths and
settings; each one's tokens must equal `generate` on it alone, computed independently, token for token
(greedy and seeded sampling alike). The audio requests add repetition_penalty=2, which keeps these random
models from repeating one token (see test_generate.py). Engines share shapes (engine_cases.py) so that
the tests share compiled programs; test_batch.py checks the decoding batch under the engine.
"""

import threading

import numpy as np
import pytest
from engine_cases import MAX_LEN, SAMPLED, SLOTS, alone, audio_request, run, text_request
from helpers import audio_tokens

from af3_jax.inference import batch as batch_module, slots
from af3_jax.inference.engine import Engine, QueueFull, Request


@pytest.fixture(scope="module")
def mix(gqa_ckpt, gqa_loaded):
  """Six requests of different kinds, and each one's tokens from `generate` alone. The first stops at
  an eos its reference meets part way; the sampled one is seeded."""
  rng, tiny = np.random.default_rng(0), gqa_ckpt.tiny
  requests = [text_request(rng, tiny, 9), audio_request(rng, tiny, 700), text_request(rng, tiny, 40, max_new=10),
              audio_request(rng, tiny, 900), text_request(rng, tiny, 30, seed=7, **SAMPLED),
              text_request(rng, tiny, 20, max_new=5)]
  free = alone(gqa_loaded, requests[0])
  assert len(set(free)) > 2, f"degenerate reference path {free}"
  requests[0] = Request(requests[0].inputs, 16, eos_token_id=free[5])
  return requests, [alone(gqa_loaded, r) for r in requests]


def test_staggered_requests_get_their_tokens_alone(gqa_loaded, mix, monkeypatch):
  requests, expected = mix
  assert len(expected[0]) == 6 and len(expected[2]) == 10
  monkeypatch.setattr(batch_module, "MIN_CACHE", 64)  # the first request's cache, which the audio one outgrows
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN)
  handles = [engine.submit(requests[0])]
  engine.step()
  engine.step()
  handles.append(engine.submit(requests[1]))  # audio, while the first decodes; the cache grows
  engine.step()
  assert engine.batch.cache_len == MAX_LEN
  handles += [engine.submit(r) for r in requests[2:]]  # more than the slots: some wait for a free one
  done = run(engine, handles)
  for i, (completion, tokens) in enumerate(zip(done, expected)):
    assert list(completion.tokens) == tokens, f"request {i}"
  assert [c.finish_reason for c in done] == ["stop"] + ["length"] * 5
  prompts = [len(r.inputs["input_ids"]) for r in requests]
  assert [(c.prompt_tokens, c.completion_tokens) for c in done] == [(n, len(t)) for n, t in zip(prompts, expected)]
  assert prompts[1] == 7 + audio_tokens(700)  # audio tokens count as prompt tokens



@pytest.mark.parametrize("decode_steps", [1, 4])
def test_a_step_reads_the_dispatch_before_once_the_next_one_is_made(gqa_loaded, mix, monkeypatch, decode_steps):
  """The host never waits for the dispatch it just made: it reads dispatch i's tokens only after
  making dispatch i + 1, so the device decodes while the host hands out tokens and schedules; only the
  last, made when no slot wants more tokens than those dispatched, is read alone. The tokens a dispatch
  decodes for requests that ended before it was read (eos, max_new_tokens) are dropped: each request
  still gets its tokens alone, one token per dispatch or several."""
  requests, expected = mix
  decode, dispatched, reads = slots.decode_fn, [], []

  class Tokens:  # a dispatch's tokens, noting when the host reads them
    def __init__(self, tokens, index):
      self.tokens, self.index = tokens, index

    def __array__(self, dtype=None, copy=None):
      reads.append((self.index, len(dispatched)))
      return np.asarray(self.tokens, dtype)

  def spy(*args, window, steps):
    state, tokens = decode(*args, window=window, steps=steps)
    dispatched.append(window)
    return state, Tokens(tokens, len(dispatched) - 1)

  monkeypatch.setattr(slots, "decode_fn", spy)
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN, decode_steps=decode_steps)
  done = run(engine, [engine.submit(r) for r in requests])
  assert [list(c.tokens) for c in done] == expected
  last = len(dispatched) - 1
  assert reads == [(i, i + 2) for i in range(last)] + [(last, last + 1)]


def test_waiting_requests_are_prefilled_together(gqa_ckpt, gqa_loaded, monkeypatch):
  """Requests that wait together are prefilled in one call whatever their prompt lengths, audio (none,
  one clip, a clip of two windows) and settings: one encoder call over all their windows, row after
  row, one prefill over their rows (padded to 4, one row of padding), each inserted into its slot. Each
  gets its tokens alone."""
  rng, tiny = np.random.default_rng(5), gqa_ckpt.tiny
  requests = [text_request(rng, tiny, 9, max_new=12), audio_request(rng, tiny, 300, windows=2, seed=2, **SAMPLED),
              audio_request(rng, tiny, 700, max_new=10)]
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN)
  prefills, prefill = [], slots.prefill_fn

  def spy(graphdef, params, inputs, *rest):
    prefills.append((inputs["input_ids"].shape, len(inputs.get("input_features", ()))))
    return prefill(graphdef, params, inputs, *rest)

  monkeypatch.setattr(slots, "prefill_fn", spy)
  done = run(engine, [engine.submit(r) for r in requests])
  assert prefills == [((4, 256), 4)]  # 3 windows, at least one a row
  for i, (completion, r) in enumerate(zip(done, requests)):
    assert list(completion.tokens) == alone(gqa_loaded, r), f"request {i}"


def test_a_prefill_batch_keeps_within_its_token_budget(gqa_ckpt, gqa_loaded):
  """Waiting requests join the oldest one's prefill while the batch's padded prompt tokens (rows x the
  longest's bucket) stay within prefill_tokens, and while slots are free."""
  rng, tiny = np.random.default_rng(6), gqa_ckpt.tiny
  engine = Engine(gqa_loaded, max_slots=8, max_len=MAX_LEN, prefill_tokens=256)
  for n in (10, 20, 30, 150, 10, 10):  # buckets 64, 64, 64, 256, 64, 64
    engine.submit(text_request(rng, tiny, n))
  groups = []
  while group := engine._next_waiting():
    groups.append([h.prompt_tokens for h in group])
  assert groups == [[10, 20, 30], [150], [10, 10]]  # 4 x 64 fits; 4 x 256 does not, 1 x 256 does
  engine = Engine(gqa_loaded, max_slots=2, max_len=MAX_LEN)
  for n in (10, 20, 30):
    engine.submit(text_request(rng, tiny, n))
  assert [h.prompt_tokens for h in engine._next_waiting()] == [10, 20]  # two free slots


def test_requests_end_inside_a_dispatch(gqa_ckpt, gqa_loaded, mix, monkeypatch):
  """With 8 decode steps a dispatch, requests end inside one: at an eos (the device stops its slot there:
  its later steps in that dispatch and the next come back -1), at a max_new_tokens that is no multiple of
  8, or cancelled while a dispatch that decodes it is in flight (its tokens are then dropped); a slot
  freed inside a dispatch takes the next request at the next turn. Each gets its tokens alone (the
  cancelled one a prefix of them)."""
  requests, expected = mix
  rng, tiny = np.random.default_rng(7), gqa_ckpt.tiny
  decode, outputs = slots.decode_fn, []

  def spy(*args, window, steps):
    state, tokens = decode(*args, window=window, steps=steps)
    outputs.append(tokens)
    return state, tokens

  monkeypatch.setattr(slots, "decode_fn", spy)
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN, decode_steps=8)
  others = [text_request(rng, tiny, 9, max_new=11), text_request(rng, tiny, 20, max_new=40)]
  handles = [engine.submit(requests[0])] + [engine.submit(r) for r in others]  # its eos is its 6th token
  engine.step()  # one prefill, the first dispatch
  at_eos = handles[0].slot
  engine.step()  # the second dispatch; the first is read: the eos request is done
  assert handles[0].result(timeout=0).finish_reason == "stop" and not handles[1].done
  engine.cancel(handles[2])  # the second dispatch, still in flight, decodes it
  late = text_request(rng, tiny, 12, max_new=5)
  handles.append(engine.submit(late))
  done = run(engine, handles)
  first, second = np.asarray(outputs[0]), np.asarray(outputs[1])
  assert list(first[:5, at_eos]) == expected[0][1:] and set(first[5:, at_eos]) == {-1} == set(second[:, at_eos])
  assert [c.finish_reason for c in done] == ["stop", "length", "cancelled", "length"]
  assert list(done[0].tokens) == expected[0] and list(done[1].tokens) == alone(gqa_loaded, others[0])
  assert list(done[2].tokens) == alone(gqa_loaded, others[1])[:9]  # the prefill's token and a dispatch's 8
  assert list(done[3].tokens) == alone(gqa_loaded, late) and handles[3].prompt_tokens == 12


def test_cancel_frees_the_slot_for_the_next_request(gqa_ckpt, gqa_loaded):
  rng, tiny = np.random.default_rng(1), gqa_ckpt.tiny
  requests = [text_request(rng, tiny, 9 + i, max_new=40) for i in range(SLOTS)]
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN)
  busy = [engine.submit(r) for r in requests]
  waiting = engine.submit(text_request(rng, tiny, 5))
  engine.cancel(waiting)  # never admitted: ends at once
  assert waiting.result(timeout=0).finish_reason == "cancelled" and waiting.result().tokens == ()
  engine.step()
  engine.step()
  slot = busy[1].slot
  engine.cancel(busy[1])
  late = text_request(rng, tiny, 12)
  handle = engine.submit(late)
  engine.step()  # the cancelled request's slot is free before the late one is admitted
  assert busy[1].done and busy[1].slot is None and handle.slot == slot
  cancelled = busy[1].result()
  # The prefill's token and the first dispatch's: the second dispatch's tokens were still on the device
  # when it was cancelled, and are dropped.
  assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) == 1 + engine.decode_steps
  done = run(engine, busy + [handle])
  assert list(cancelled.tokens) == alone(gqa_loaded, requests[1])[:len(cancelled.tokens)]
  assert list(done[-1].tokens) == alone(gqa_loaded, late)
  assert [len(c.tokens) for c in done[::2]] == [40, 40]


def test_a_started_engine_serves_threads_and_drains_on_stop(gqa_loaded, mix):
  """submit from several threads at once; each request's listener sees what its queue sees; stop(drain=True)
  returns once every submitted request is done, and later submits are refused."""
  requests, expected = mix
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN)
  engine.start()
  heard = [[] for _ in requests]
  handles = [None] * len(requests)

  def client(i):
    handles[i] = engine.submit(requests[i], listener=heard[i].append)

  threads = [threading.Thread(target=client, args=(i,)) for i in reversed(range(len(requests)))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  engine.stop(drain=True)
  for i, handle in enumerate(handles):
    assert handle.done and list(handle) == expected[i] == heard[i][:-1] and heard[i][-1] is None
  with pytest.raises(RuntimeError, match="stopping"):
    engine.submit(requests[0])


def test_map_answers_in_order_in_the_callers_thread(gqa_loaded, mix):
  """Without `start`, `map` steps the engine itself; an item the engine refuses comes back in its place."""
  requests, expected = mix
  items = [5, 2, None, 3, 1, 4]
  to_request = lambda i: Request({"input_ids": np.zeros(300, int)}, 1) if i is None else requests[i]
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN)
  answers = list(engine.map(items, to_request))
  assert [item for item, _ in answers] == items
  assert isinstance(answers[2][1], ValueError) and "max_len" in str(answers[2][1])
  assert [list(c.tokens) for i, c in answers if i is not None] == [expected[i] for i in items if i is not None]


def test_bad_requests_and_a_full_queue_are_refused(gqa_ckpt, gqa_loaded):
  rng, tiny = np.random.default_rng(3), gqa_ckpt.tiny
  engine = Engine(gqa_loaded, max_slots=SLOTS, max_len=MAX_LEN, max_queue=2)
  with pytest.raises(ValueError, match="the prompt has 250 tokens; with 16 new tokens that is more than the "
                                       "engine's max_len of 256"):
    engine.submit(text_request(rng, tiny, 250))
  audio = audio_request(rng, tiny, 700)
  with pytest.raises(ValueError, match="<sound> tokens"):
    engine.submit(Request({**audio.inputs, "input_ids": np.delete(audio.inputs["input_ids"], 4)}, 4))  # one <sound> short
  with pytest.raises(ValueError, match="one row"):
    engine.submit(Request({"input_ids": np.ones((2, 5), int)}, 4))
  with pytest.raises(ValueError, match="invalid sampling settings"):
    engine.submit(text_request(rng, tiny, 5, do_sample=True, temperature=0.0))
  engine.submit(text_request(rng, tiny, 5))
  engine.submit(text_request(rng, tiny, 5))
  with pytest.raises(QueueFull):
    engine.submit(text_request(rng, tiny, 5))


