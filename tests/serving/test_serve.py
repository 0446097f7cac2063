"""The server with the official `openai` client against a real uvicorn on 127.0.0.1, over the tiny
checkpoint (float32), started once for the module: answers against `af3_jax.generate` on the same
conversation alone, streams against whole answers, exact usage, concurrency, every refused request
and its status, cancellation, transcriptions; `serve.py` itself as a process (SIGTERM drains, bad flags).

The server's context is 256 tokens with 4 slots, so warming up compiles few programs; the random
model has no eos, so every answer runs to its max_tokens (finish_reason "length").
"""

import base64
import concurrent.futures
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import CLIPS, ROOT, audio_tokens
from programs import MAX_LEN, NAME, SLOTS, alone, ask, conversations, serving, text, wav_part

import af3_jax

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from af3_jax.serving.app import create_app  # noqa: E402
from af3_jax.serving.service import Service  # noqa: E402
from af3_jax.serving.chat import Translator  # noqa: E402



@pytest.fixture(scope="module")
def server(model_dir, media):
  with serving(model_dir, media) as running:
    yield running


def post(port: int, path: str, body, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict | str]:
  """A raw POST (bodies the openai client would not send); returns (status, parsed JSON or text)."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  conn.request("POST", path, data, {"content-type": "application/json", **(headers or {})})
  response = conn.getresponse()
  raw = response.read().decode()
  conn.close()
  try:
    return response.status, json.loads(raw)
  except json.JSONDecodeError:
    return response.status, raw


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


def _long_silence(folder: Path) -> Path:
  path = folder / "long.flac"
  if not path.exists():  # FLAC packs silence into a few kB
    sf.write(path, np.zeros(601 * 16000, np.int16), 16000)
  return path


BAD = {
    "no messages": ({"messages": []}, "messages"),
    "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                          "image_url"),
    "audio_url as a bare string": ({"messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": "data:audio/wav;base64,AAAA"}]}]}, "messages[0].content[0].audio_url"),
    "unreadable audio": ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF not really").decode(), "format": "wav"}}]}]},
        "messages[0].content[0]: not a readable audio file"),
    "not base64": ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]}]}, "not valid base64"),
    "a data: URL as input_audio": ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "data:audio/wav;base64,AAAA", "format": "wav"}}]}]},
        "input_audio.data takes bare base64"),
    "an audio format we do not take": ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aac"}}]}]}, "format"),
    "a network URL": ({"messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}]}]}, "does not fetch audio"),
    "a local file outside the allowed folder": ({"messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}]}]}, "outside --allowed-local-media-path"),
    "a prompt over the context": ({"messages": [{"role": "user", "content": "Describe the sound. " * 100}]},
                                  "fills the server's context of 256"),
    "a prompt and max_tokens over the context": ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 250},
                                                 "max_tokens (or max_completion_tokens) is 250, but the prompt has"),
    "temperature below 0": ({"messages": [{"role": "user", "content": "Hi"}], "temperature": -1}, "temperature"),
    "top_p 0": ({"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}, "top_p"),
    "max_tokens 0": ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens"),
    "a seed over 31 bits": ({"messages": [{"role": "user", "content": "Hi"}], "seed": 2**40}, "seed"),
    "n 2": ({"messages": [{"role": "user", "content": "Hi"}], "n": 2}, "n: "),
    "a <sound-2> tag without a second audio": ({"messages": [{"role": "user", "content": "Hi <sound-2>"}]},
                                               "<sound-2>"),
    "not JSON": (b"{not json", "not valid JSON"),
    "three fields wrong": ({"messages": [{"role": "bob", "content": [{"type": "text", "text": 5}]}], "temperature": "x"},
                           "messages[0].role: Input should be 'system', 'user' or 'assistant'; messages[0].content[0].text: "
                           "Input should be a valid string; temperature: "),
    "content a number": ({"messages": [{"role": "user", "content": 5}]},
                         "messages[0].content: Input should be a valid string or a valid list"),
    "features we do not implement": ({"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                                      "frequency_penalty": 0.5}, "body: logprobs, frequency_penalty: not implemented"),
    "a JSON response_format": ({"messages": [{"role": "user", "content": "Hi"}],
                                "response_format": {"type": "json_object"}}, "response_format: not implemented"),
    "a lone surrogate": (b'{"messages": [{"role": "user", "content": "Hi \\ud800"}]}', "messages[0].content: the text is not"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_400_in_openais_shape(server, case):
  body, says = BAD[case]
  status, reply = post(server.port, "/v1/chat/completions", body)
  assert status == 400, reply
  assert says in reply["error"]["message"], reply
  assert reply == {"error": {"message": reply["error"]["message"], "type": "invalid_request_error", "param": None,
                             "code": None}}


def test_other_refusals_and_the_server_still_answers(server, media, monkeypatch):
  """Audio over 10 minutes (400), another model's name (404), a body over the limit (413, refused from
  its Content-Length before it is sent), a full queue (429), an unknown route (404); then a good request
  is still answered right."""
  messages, conversation = conversations(media)["audio"]
  status, reply = post(server.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
      wav_part(_long_silence(media))]}]})
  assert status == 400 and "longer than 10 minutes" in reply["error"]["message"]
  status, reply = post(server.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
      {"type": "audio_url", "audio_url": {"url": f"file://{media}"}}]}]})  # a local folder: named
  assert (status, reply["error"]["message"]) == (400, f"messages[0].content[0]: {media}: is a directory, not an audio file")
  with pytest.raises(openai.NotFoundError, match="does not exist") as info:
    server.client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
  assert info.value.body == {"message": f"the model 'gpt-4o' does not exist; this server serves {NAME!r}",
                             "type": "invalid_request_error", "param": None, "code": "model_not_found"}
  with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 300000000\r\n\r\n{")
    assert s.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 413 Request Entity Too Large"
  monkeypatch.setattr(server.service.engine, "max_queue", 0)
  with pytest.raises(openai.RateLimitError) as info:
    ask(server, messages, max_tokens=2)
  assert (info.value.body["type"], info.value.body["code"]) == ("requests", "rate_limit_exceeded")
  monkeypatch.undo()
  assert post(server.port, "/v1/nothing", {}) == (404, {"error": {"message": "Not Found: POST /v1/nothing", "type":
                                                                 "invalid_request_error", "param": None, "code": None}})
  status, reply = post(server.port, "/v1/chat/completions", {"messages": messages},  # curl -d without -H
                       {"content-type": "application/x-www-form-urlencoded"})
  assert status == 400 and "content-type: application/json" in reply["error"]["message"], reply
  expected, _, _ = alone(server, conversation, 12)
  assert ask(server, messages, max_tokens=12).choices[0].message.content == expected


def test_a_client_that_goes_away_frees_its_slot(server, media, monkeypatch):
  """A stream closed after two chunks, and a whole answer whose client times out, are cancelled at once
  (far short of their max_tokens; each decode step is slowed to 20 ms, so 200 tokens would take 4 s),
  and the next request is answered."""
  engine = server.service.engine
  handles = []
  submit, decode = engine.submit, engine.batch.decode
  monkeypatch.setattr(engine, "submit", lambda *a, **k: handles.append(submit(*a, **k)) or handles[-1])
  monkeypatch.setattr(engine.batch, "decode", lambda: time.sleep(0.02) or decode())
  messages, conversation = conversations(media)["text"]
  stream = ask(server, messages, max_tokens=200, stream=True)
  next(stream), next(stream)
  stream.close()
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.5)
  conn.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 200}),
               {"content-type": "application/json"})
  with pytest.raises(TimeoutError):
    conn.getresponse()
  conn.close()
  for handle in handles:
    done = handle.result(timeout=60)
    assert done.finish_reason == "cancelled" and len(done.tokens) < 200
  deadline = time.time() + 30
  while len(engine._free) < SLOTS and time.time() < deadline:  # freed by the engine's next step
    time.sleep(0.05)
  assert len(engine._free) == SLOTS
  assert ask(server, messages, max_tokens=5).choices[0].message.content == alone(server, conversation, 5)[0]


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


def test_a_second_signal_cuts_running_requests_short_in_openais_shape(server, monkeypatch, caplog):
  """serve.py's server: a first Ctrl-C drains; a second, with a stream and a whole answer still running
  (each step slowed to 50 ms, 200 tokens asked), ends both at once: the whole answer is a 503 in OpenAI's
  shape, the stream an error event and [DONE]; nothing is logged as an error and the server stops."""
  import serve

  app = create_app(NAME)
  app.state.service = Service.start(server.model, server.processor, max_slots=SLOTS, max_len=MAX_LEN)
  engine = app.state.service.engine
  decode = engine.batch.decode
  monkeypatch.setattr(engine.batch, "decode", lambda: time.sleep(0.05) or decode())
  listener = socket.create_server(("127.0.0.1", 0))
  port = listener.getsockname()[1]
  http_server = serve._Server(uvicorn.Config(app, log_level="info"), app)
  uvicorn_log = logging.getLogger("uvicorn")  # configured by uvicorn not to propagate to the root logger
  uvicorn_log.addHandler(caplog.handler)
  thread = threading.Thread(target=http_server.run, kwargs={"sockets": [listener]}, daemon=True)
  thread.start()
  while not http_server.started:
    time.sleep(0.05)
  body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200}
  results = {}

  def stream():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                 {"content-type": "application/json"})
    results["stream"] = [e for e in conn.getresponse().read().decode().split("\n\n") if e]

  clients = [threading.Thread(target=stream),
             threading.Thread(target=lambda: results.update(whole=post(port, "/v1/chat/completions", body, timeout=60)))]
  for c in clients:
    c.start()
  deadline = time.time() + 60
  while len(app.state.service.running) < 2 and time.time() < deadline:
    time.sleep(0.02)
  with caplog.at_level(logging.INFO):
    http_server.handle_exit(signal.SIGINT, None)
    time.sleep(0.3)
    assert thread.is_alive()  # draining: both still answering
    http_server.handle_exit(signal.SIGINT, None)
    for c in clients:
      c.join(timeout=60)
    thread.join(timeout=60)
  uvicorn_log.removeHandler(caplog.handler)
  assert not thread.is_alive()
  stopped = {"message": "the server stopped before the answer was done", "type": "server_error", "param": None,
             "code": "shutting_down"}
  assert results["whole"] == (503, {"error": stopped})
  assert results["stream"][-1] == "data: [DONE]" and json.loads(results["stream"][-2][6:]) == {"error": stopped}
  assert "cutting the running requests short; a third signal quits at once" in caplog.messages
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_a_transcription_takes_at_most_448_tokens_a_window(server, media, tmp_path):
  """Bounded by its audio, not by the context: a model that never says its eos (as the tiny one) stops."""
  translator = Translator(server.processor, max_len=32768)
  sf.write(tmp_path / "long.wav", 0.1 * np.random.default_rng(0).standard_normal(45 * 16000), 16000)
  for path, windows in ((media / "a.wav", 1), (tmp_path / "long.wav", 2)):
    request = translator.transcription(path.read_bytes(), path.name, 0.0)
    assert request.max_new_tokens == 448 * windows


def _serve(model_dir, *args, log=subprocess.PIPE) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), *args], cwd=ROOT,
                          env=env, stdout=log, stderr=log, text=True)


@pytest.mark.parametrize("args, says", [
    (["--port", "abc"], "error: flag --port=abc: invalid literal"),
    (["--max-slots", "0"], "error: flag --max-slots=0"),
    (["--allowed-local-media-path", "/no/such/folder"], "error: /no/such/folder: --allowed-local-media-path is not a folder"),
], ids=["port", "slots", "media"])
def test_bad_flags_are_one_line(model_dir, args, says):
  proc = _serve(model_dir, *args)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 1 and err.startswith(says) and err.count("\n") == 1, err


def test_a_missing_model_is_one_line(tmp_path):
  proc = _serve(tmp_path / "nothing", "--port", "0")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 1 and err == f"error: {tmp_path / 'nothing'}: no such checkpoint directory\n", err


@pytest.mark.slow
def test_sigterm_finishes_running_requests_and_exits_0(model_dir, tmp_path):
  """503 while loading, 200 once warm (the log says so, phase by phase); SIGTERM in the middle of a stream:
  the stream runs to its end, the process exits 0."""
  listener = socket.create_server(("127.0.0.1", 0))
  port = listener.getsockname()[1]
  listener.close()
  log = open(tmp_path / "log", "w")
  proc = _serve(model_dir, "--port", str(port), "--dtype", "float32", "--max-model-len", "128", "--max-slots", "2",
                log=log)
  seen = []
  try:
    deadline = time.time() + 240
    while not seen or seen[-1] != 200:
      assert time.time() < deadline and proc.poll() is None, (tmp_path / "log").read_text()
      try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        seen.append(conn.getresponse().status)
      except OSError:
        time.sleep(0.2)
    assert 503 in seen
    log_text = (tmp_path / "log").read_text()
    assert "loaded in" in log_text and "warm-up 1/" in log_text and "more programs compile in the background" in log_text
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 60, "temperature": 0, "stream": True}),
                 {"content-type": "application/json"})
    response = conn.getresponse()
    first = response.readline()
    assert first.startswith(b"data: ")
    proc.send_signal(signal.SIGTERM)
    events = [e for e in (first + response.read()).decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=60) == 0
  finally:
    proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["ctrl-c", "sigterm"])
def test_stopped_while_loading_exits_cleanly(model_dir, sig, code):
  """Ctrl-C or SIGTERM while the model compiles its programs ends the process with its status, not
  with an abort from tearing the interpreter down under a compile (loading the tiny model and compiling
  what it answers first takes over 10 s on 2 cores; the signal comes 3 s in)."""
  proc = _serve(model_dir, "--port", "0", "--dtype", "float32", "--max-model-len", "4096")
  try:
    for line in proc.stderr:
      if "loading" in line:
        break
    time.sleep(3)
    assert proc.poll() is None
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "terminate called" not in err, err
  finally:
    proc.kill()
