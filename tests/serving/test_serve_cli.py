"""`serve.py` itself: its signals (a first Ctrl-C or SIGTERM drains running requests, a second cuts
them short in OpenAI's shape, a signal while loading exits cleanly), bad flags and a missing model in
one line, as a process or on a real uvicorn in this one, over the tiny checkpoint.
"""

import http.client
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT
from programs import ENV, MAX_LEN, NAME, SLOTS, post

uvicorn = pytest.importorskip("uvicorn")
from af3_jax.serving.app import create_app  # noqa: E402
from af3_jax.serving.service import Service  # noqa: E402


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


def _serve(model_dir, *args, log=subprocess.PIPE) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), *args], cwd=ROOT,
                          env=ENV, stdout=log, stderr=log, text=True)


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
