"""The README's offline walkthrough ("Try it without the weights") runs as written: each of its bash
blocks in turn, read from the README itself, in a fresh copy of the repository, as a new user runs
them (one CPU device, nothing but the copy and the installed packages). The only change: the server's
port 8000 becomes a free one. About 10 minutes on 2 cores, most of it compiling: slow (.ci/run runs it)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

SECTION = "## Try it without the weights"


def walkthrough() -> list[str]:
  """The bash blocks of the README's walkthrough section, in order."""
  text = (ROOT / "README.md").read_text()
  section = text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)```", section, re.S)


def test_the_walkthrough_has_its_steps():
  """Fast: the section is there and covers every tool (the slow test below runs it)."""
  commands = "\n".join(walkthrough())
  for tool in ("convert.tiny", "infer.py", "--chat", "--batch", "serve.py", "curl", "eval.py", "train.py",
               "convert.to_hf", "convert.from_hf"):
    assert tool in commands, tool


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
  """The repository's files as a fresh clone of this working tree has them (tracked and new, not ignored)."""
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
  dst = tmp_path_factory.mktemp("clone") / "af3-jax"
  for name in filter(None, listed.split("\0")):
    if (ROOT / name).is_file():
      (dst / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, dst / name)
  return dst


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(clone):
  with socket.socket() as s:  # a port free now, for the server block
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  # A user's environment: `python` is this interpreter; one CPU device, not the suite's eight fake ones.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "AF3_VERBOSITY")}
  env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
  for block in walkthrough():
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace("8000", port)], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"{block}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"
    # Quiet and clean: no traceback, no library INFO line (absl's "I1204 ..." or ours).
    noise = [line for line in run.stderr.splitlines() if "Traceback" in line or re.match(r"(I\d{4} |info: )", line)]
    assert not noise, f"{block}\n{noise[:5]}"
  runs = clone / "runs"
  assert [json.loads(line)["id"] for line in (runs / "answers.jsonl").read_text().splitlines()] == ["q1", "q2", "q3"]
  manifest = json.loads((runs / "eval" / "manifest" / "summary.json").read_text())
  assert (manifest["items"], manifest["answered"], manifest["n"], manifest["no_reference"]) == (3, 3, 1, 2)
  assert json.loads((runs / "eval" / "mmau" / "summary.json").read_text())["items"] == 1
  assert len((runs / "train" / "metrics.jsonl").read_text().splitlines()) == 4
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (runs / "train-hf").iterdir()}
  assert (runs / "tiny-orbax" / "params").is_dir()
