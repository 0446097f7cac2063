"""The server's answers with the official `openai` client against a real uvicorn on 127.0.0.1, over the
tiny checkpoint (float32), started once for the package (conftest.py): answers against
`af3_jax.generate` on the same conversation alone, streams against whole answers, exact usage, stop
strings, seeds and vLLM's extra settings, concurrency, transcriptions.

The server's context is 256 tokens with 4 slots, so warming up compiles few programs; the random
model has no eos, so every answer runs to its max_tokens (finish_reason "length").
"""

import concurrent.futures
import http.client
import json

import numpy as np
import pytest
import soundfile as sf
from helpers import CLIPS, audio_tokens
from programs import MAX_LEN, NAME, alone, ask, conversations, post, text

import af3_jax

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from af3_jax.serving.chat import Translator  # noqa: E402


def test_answers_equal_generate_with_exact_usage(server, media):
  """Text, one audio (base64 in lines), two audios in a message (one a data: URL), audio in two turns (a local
  file, then a data: URL): each answer, its finish reason and its token counts are `generate`'s alone;
  the prompt counts hold each clip's audio tokens, counted here from its length."""
  frames = {name: int(seconds * 100) for name, seconds in CLIPS.items()}  # 10 ms hop
  audio_ids = {"text": 0, "audio": audio_tokens(frames["a.wav"]),
               **dict.fromkeys(["two audios", "two turns"], audio_tokens(frames["a.wav"]) + audio_tokens(frames["b.flac"]))}
  for name, (messages, conversation) in conversations(media).items():
    expected, prompt, completion = alone(server, conversation, 12)
    reply = ask(server, messages, max_tokens=12)
    assert reply.choices[0].message.content == expected and expected, name
    assert reply.choices[0].finish_reason == "length" and reply.model == NAME
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt, completion, prompt + completion), name
    ids = server.processor.apply_chat_template(conversation)["input_ids"][0]
    assert (ids == server.processor.audio_token_id).sum() == audio_ids[name], name


def test_a_stream_is_the_answer_in_pieces(server, media):
  messages, _ = conversations(media)["audio"]
  whole = ask(server, messages, max_completion_tokens=20)
  chunks = list(ask(server, messages, max_completion_tokens=20, stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
  assert len([p for p in content if p]) > 1 and "".join(content) == whole.choices[0].message.content
  reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert reasons == ["length"]
  assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
  assert all(c.usage is None for c in chunks[:-1])
  # The wire format itself: the role first, data: lines, [DONE] last.
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
  conn.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 3, "stream": True}),
               {"content-type": "application/json"})
  response = conn.getresponse()
  events = [e for e in response.read().decode().split("\n\n") if e]
  assert response.getheader("content-type").startswith("text/event-stream")
  assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
  assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_stop_strings_and_seeds(server, media):
  """A stop string ends the answer before it (finish_reason "stop"), streamed or not, and counts the
  tokens up to it; a seeded sampled request is reproducible."""
  messages, _ = conversations(media)["text"]
  full = ask(server, messages, max_tokens=30).choices[0].message.content
  k = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
  stop = full[k:k + 2]
  cut = ask(server, messages, max_tokens=30, stop=[stop, "never appears"])
  assert cut.choices[0].message.content == full[:full.index(stop)]
  assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 30
  streamed = list(ask(server, messages, max_tokens=30, stop=stop, stream=True))
  assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[:full.index(stop)]
  assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == ["stop"]
  sampled = [server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0.9,
                                                   top_p=0.95, seed=11).choices[0].message.content for _ in range(2)]
  assert sampled[0] == sampled[1]


def test_nulls_and_fields_we_do_not_use_are_taken(server, media):
  """null where OpenAI allows it, and fields OpenAI or vLLM define that we do not use, change nothing,
  as in vLLM: the answer is the plain request's."""
  messages, _ = conversations(media)["text"]
  extras = {"stream": None, "n": None, "stop": None, "seed": None, "stream_options": None, "user": "u",
            "logprobs": False, "frequency_penalty": 0, "tools": [], "metadata": {"a": "b"}, "top_k": -1,
            "response_format": {"type": "text"}, "repetition_penalty": 1}
  status, reply = post(server.port, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0,
                                                            **extras})
  assert status == 200, reply
  assert reply["choices"][0]["message"]["content"] == ask(server, messages, max_tokens=4).choices[0].message.content


def test_vllms_top_k_and_repetition_penalty(server, media):
  """top_k 1 samples the greedy token at any temperature; repetition_penalty is generate's."""
  messages, conversation = conversations(media)["audio"]
  batch = server.processor.apply_chat_template(conversation)
  penalised = af3_jax.generate(server.model, batch, 8, do_sample=False, repetition_penalty=1.5)[0].tolist()
  reply = ask(server, messages, max_tokens=8, extra_body={"repetition_penalty": 1.5})
  assert reply.choices[0].message.content == server.processor.tokenizer.decode(penalised, skip_special_tokens=True)
  sampled = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=1.5,
                                                  extra_body={"top_k": 1})
  assert sampled.choices[0].message.content == alone(server, conversation, 8)[0]


def test_concurrent_requests_each_get_their_answer_alone(server, media):
  """8 requests at once, of different lengths and budgets, on 4 slots: each gets what `generate` gives
  it alone."""
  words = "Describe the sound. What is in this audio? Transcribe the input speech. Please think and reason."
  jobs = [([{"role": "user", "content": words[:8 + 11 * i]}], 4 + 3 * i) for i in range(8)]
  expected = [alone(server, messages, n)[0] for messages, n in jobs]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    replies = list(pool.map(lambda job: ask(server, job[0], max_tokens=job[1]), jobs))
  assert [r.choices[0].message.content for r in replies] == expected
  assert [r.usage.completion_tokens for r in replies] == [n for _, n in jobs]


def test_transcriptions(server, media):
  """json and text: the transcription prompt's greedy answer, trimmed; a broken upload is a 400."""
  path = media / "a.wav"
  conversation = [{"role": "user", "content": [{"type": "audio", "path": str(path)},
                                               text("Transcribe the input speech.")]}]
  expected = alone(server, conversation, MAX_LEN - server.processor.apply_chat_template(conversation)["input_ids"].shape[1])[0]
  with open(path, "rb") as f:
    reply = server.client.audio.transcriptions.create(model=NAME, file=f)
  assert reply.text == expected.strip() and reply.text
  with open(path, "rb") as f:
    assert server.client.audio.transcriptions.create(model=NAME, file=f, response_format="text") == expected.strip()
  with pytest.raises(openai.BadRequestError, match="not a readable audio file"):
    server.client.audio.transcriptions.create(model=NAME, file=("broken.wav", b"RIFF not really"))


def test_a_transcription_takes_at_most_448_tokens_a_window(server, media, tmp_path):
  """Bounded by its audio, not by the context: a model that never says its eos (as the tiny one) stops."""
  translator = Translator(server.processor, max_len=32768)
  sf.write(tmp_path / "long.wav", 0.1 * np.random.default_rng(0).standard_normal(45 * 16000), 16000)
  for path, windows in ((media / "a.wav", 1), (tmp_path / "long.wav", 2)):
    request = translator.transcription(path.read_bytes(), path.name, 0.0)
    assert request.max_new_tokens == 448 * windows
