"""Running the programs from the tests: infer.py and eval.py in this process (jit caches shared across
tests), train.py (and its metrics and checkpoints read back) and convert.to_hf as processes, and serve.py's
app on a real uvicorn with the `openai` client, with the chat conversations the server tests send."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from absl import flags
from helpers import ROOT

import af3_jax
from af3_jax.inference import assistant

ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device per run


def to_hf(workdir, out, *flags):
  run = subprocess.run([sys.executable, "-m", "convert.to_hf", f"--workdir={workdir}", f"--out={out}", *flags],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  return out


def train_args(workdir, model, manifest, *extra, config="configs/tiny.py") -> list[str]:
  """train.py's command line after `python`: one run of `config` from `model` on `manifest`."""
  return ["train.py", f"--config={config}", f"--workdir={workdir}", f"--config.init_from={model}",
          f"--config.data.train={manifest}", *extra]


def train(workdir, model, manifest, *extra, wait=True, config="configs/tiny.py"):
  proc = subprocess.Popen([sys.executable, *train_args(workdir, model, manifest, *extra, config=config)], cwd=ROOT,
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def losses(workdir):
  """(loss by step, every record) of the metrics.jsonl a train.py run wrote in `workdir`."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records}, records


def wait_for_steps(workdir, n: int, timeout: float = 300) -> None:
  """Returns once a running train.py has logged `n` lines to `workdir`'s metrics.jsonl, or after `timeout` s."""
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < n):
    time.sleep(0.05)


def saved_params(workdir, step) -> dict:
  """The trainable params a run's checkpoint holds at `step`, read with orbax alone, as a pure dict."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore((workdir / "checkpoints" / str(step) / "state").absolute())["params"]
  unwrap = lambda tree: tree["value"] if set(tree) == {"value"} else {k: unwrap(v) for k, v in tree.items()}
  return unwrap(saved)  # orbax keeps nnx.State's leaf level


def run_cli(args, stdin="", capsys=None, monkeypatch=None):
  """Runs infer.main in this process (shared jit caches keep the suite fast); returns (code, out, err).
  `stdin` is the text to read, or any iterable of lines (one can raise KeyboardInterrupt)."""
  import infer

  flags.FLAGS.unparse_flags()
  infer._parse_flags(["infer.py", *args])
  monkeypatch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
  with pytest.raises(SystemExit) as exited:
    infer.main(["infer.py"])
  captured = capsys.readouterr()
  return exited.value.code, captured.out, captured.err


def assert_answers_as_transformers(model_dir, processor_cls, model_cls, template: str, audio, prompt: str,
                                   capsys, monkeypatch) -> None:
  """infer.py's greedy answer (12 new tokens) to one audio and a prompt is transformers' through its
  processor and model classes (and `template`)."""
  import torch
  import transformers

  args = ["--model", str(model_dir), "--audio", str(audio), "--prompt", prompt, "--greedy", "--dtype", "float32",
          "--max-new-tokens", "12"]
  code, out, err = run_cli(args, capsys=capsys, monkeypatch=monkeypatch)
  assert code == 0 and "new tokens/s" in err
  processor = processor_cls(
      feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
      tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir), chat_template=template)
  conv = [{"role": "user", "content": [{"type": "audio", "path": str(audio)}, {"type": "text", "text": prompt}]}]
  inputs = processor.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
  torch_model = model_cls.from_pretrained(model_dir).eval()
  with torch.no_grad():
    new = torch_model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:]
  expected = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
  assert expected and out.strip() == expected


FAST = ["--dtype", "float32", "--max-new-tokens", "3"]


def run_eval(args, capsys):
  """eval.py's main in this process (jit caches shared across tests); returns (code, out, err)."""
  import eval as eval_cli

  eval_cli.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exited:
    eval_cli.main(["eval.py", *args])
  captured = capsys.readouterr()
  return exited.value.code, captured.out, captured.err


NAME = "af3-tiny"


SLOTS, MAX_LEN = 4, 256


@contextlib.contextmanager
def serving(model_dir, media):
  """A warm server of `model_dir` in a thread of this process; `model` and `processor` are the ones it serves."""
  import openai
  import uvicorn

  from af3_jax.serving.app import create_app
  from af3_jax.serving.service import Service

  model, processor = assistant.load(model_dir, dtype="float32", think=False, style="hf")
  app = create_app(NAME)
  app.state.service = Service.start(model, processor, max_slots=SLOTS, max_len=MAX_LEN, media_root=media)
  listener = socket.create_server(("127.0.0.1", 0))
  port = listener.getsockname()[1]
  http_server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=http_server.run, kwargs={"sockets": [listener]}, daemon=True)
  thread.start()
  while not http_server.started:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
  try:
    yield SimpleNamespace(port=port, client=client, model=model, processor=processor, service=app.state.service)
  finally:
    http_server.should_exit = True
    thread.join(timeout=60)


def b64(path: Path) -> str:
  return base64.b64encode(path.read_bytes()).decode()


def wav_part(path: Path, wrap: bool = False) -> dict:
  """An input_audio part; `wrap`: its base64 in lines of 76 characters, as the `base64` command writes it."""
  data = b64(path)
  if wrap:
    data = "\n".join(data[i:i + 76] for i in range(0, len(data), 76))
  return {"type": "input_audio", "input_audio": {"data": data, "format": path.suffix[1:]}}


def text(t: str) -> dict:
  return {"type": "text", "text": t}


def conversations(media: Path) -> dict[str, tuple[list, list]]:
  """name -> (OpenAI messages, the same conversation for our processor with file paths)."""
  a, b = media / "a.wav", media / "b.flac"
  audio = lambda p: {"type": "audio", "path": str(p)}
  data_url = {"type": "audio_url", "audio_url": {"url": f"data:audio/flac;base64,{b64(b)}"}}
  local = {"type": "audio_url", "audio_url": {"url": f"file://{a}"}}
  return {
      "text": ([{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Say hi."}]),
      "audio": ([{"role": "user", "content": [wav_part(a, wrap=True), text("What is in this audio?")]}],
                [{"role": "user", "content": [audio(a), text("What is in this audio?")]}]),
      "two audios": ([{"role": "user", "content": [wav_part(a), data_url, text("Compare them.")]}],
                     [{"role": "user", "content": [audio(a), audio(b), text("Compare them.")]}]),
      "two turns": ([{"role": "system", "content": "You are a careful listener."},
                     {"role": "user", "content": [local, text("Describe the sound.")]},
                     {"role": "assistant", "content": "A dog."},
                     {"role": "user", "content": [text("And this one?"), data_url]}],
                    [{"role": "system", "content": "You are a careful listener."},
                     {"role": "user", "content": [audio(a), text("Describe the sound.")]},
                     {"role": "assistant", "content": "A dog."},
                     {"role": "user", "content": [text("And this one?"), audio(b)]}]),
  }


def alone(server, conversation: list, max_tokens: int) -> tuple[str, int, int]:
  """(text, prompt tokens, completion tokens) of greedy `generate` on the conversation by itself."""
  batch = server.processor.apply_chat_template(conversation)
  tokens = af3_jax.generate(server.model, batch, max_tokens, do_sample=False)[0].tolist()
  return server.processor.tokenizer.decode(tokens, skip_special_tokens=True), batch["input_ids"].shape[1], len(tokens)


def ask(server, messages, **kwargs):
  return server.client.chat.completions.create(model=NAME, messages=messages, temperature=0, **kwargs)


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
