"""What the server refuses, and that it still answers after: every bad request a 400 in OpenAI's shape,
a full queue, an unknown route, a wrong content type; a client that goes away has its request cancelled
and its slot freed. The server is conftest.py's (the tiny checkpoint on a real uvicorn).
"""

import base64
import http.client
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from programs import NAME, SLOTS, alone, ask, conversations, post, wav_part

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


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
