"""The documentation's commands run as written, as a new user runs them: one CPU device, a fresh copy of
the repository, the installed packages and an empty compilation cache (shared by the two copies below).

- docs/quickstart.md, the offline walkthrough: each of its bash blocks in turn, read from the page.
- README.md's examples (its "Try it without the weights" and "Use it" sections): each bash and python
  block in turn, in a copy of its own, with the tiny checkpoint `runs/tiny` in place of the hub id and
  small files for the inputs a user brings (`clip.wav`, `questions.json`, `mmau-test-mini.json`,
  `train.json`). A command marked `# not run by the tests: WHY` is left out (the README says why).

The only other change: the server's port 8000 becomes a free one. About 10 minutes on 2 cores, most of
it compiling: slow (.ci/run runs it). The fast tests check what the pages hold, and that every link
between them, and every citation of docs/ in the code, leads somewhere.
"""

import functools
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

HUB_ID = "nvidia/audio-flamingo-3-hf"
TINY = "runs/tiny"
SKIP = "# not run by the tests"
README_SECTIONS = ("Try it without the weights", "Use it")

# The inputs README's examples name, small: a 3 s clip, a manifest (one item with a reference answer,
# one with two clips, one text only), an MMAU-format file and a training manifest, all next to the clip.
CLIP = ("import numpy as np, soundfile as sf; "
        "sf.write('clip.wav', 0.1 * np.random.default_rng(0).standard_normal(48000), 16000)")
INPUTS = {
    "questions.json": [
        {"id": "q1", "sound": "clip.wav", "conversations": [
            {"from": "human", "value": "<sound>\nWhat is in this audio?"}, {"from": "gpt", "value": "Soft noise."}]},
        {"id": "q2", "sound": ["clip.wav", "clip.wav"],
         "conversations": [{"from": "human", "value": "Is <sound-1> louder than <sound-2>?"}]},
        {"id": "q3", "conversations": [{"from": "human", "value": "Say hi."}]}],
    "mmau-test-mini.json": [
        {"id": "m1", "audio_id": "./clip.wav", "question": "What is the source of the sound?",
         "choices": ["Rain", "Wind", "Traffic", "Static"], "answer": "Static", "task": "sound",
         "category": "Reasoning", "sub-category": "Acoustic Source Inference", "difficulty": "easy"}],
    "train.json": [
        {"id": "t1", "sound": "clip.wav", "conversations": [
            {"from": "human", "value": "<sound>\nWhat is in this audio?"}, {"from": "gpt", "value": "Soft noise."}]},
        {"id": "t2", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]}],
}


def code_blocks(text: str) -> list[tuple[str, str]]:
  """(language, code) of each bash and python block of a markdown text, in order."""
  return re.findall(r"```(bash|python)\n(.*?)```", text, re.S)


def section(text: str, title: str) -> str:
  return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def quickstart() -> list[str]:
  return [code for _, code in code_blocks((ROOT / "docs" / "quickstart.md").read_text())]


def without_skipped(code: str) -> str:
  """The code without the commands marked SKIP (a command: its lines joined by trailing backslashes)."""
  commands, current = [], []
  for line in code.splitlines(keepends=True):
    current.append(line)
    if not line.rstrip("\n").endswith("\\"):
      commands.append("".join(current))
      current = []
  return "".join(c for c in commands + current if SKIP not in c)


def readme_examples() -> list[tuple[str, str]]:
  text = (ROOT / "README.md").read_text()
  return [(lang, without_skipped(code).replace(HUB_ID, TINY)) for title in README_SECTIONS
          for lang, code in code_blocks(section(text, title))]


def test_the_pages_have_their_steps():
  """Fast: the walkthrough covers every tool, README's examples every front end, and each skip says why
  (the slow tests below run them)."""
  commands = "\n".join(quickstart())
  for tool in ("convert.tiny", "infer.py", "--chat", "--batch", "serve.py", "curl", "eval.py", "train.py",
               "convert.to_hf", "convert.from_hf"):
    assert tool in commands, tool
  examples = "\n".join(code for _, code in readme_examples())
  for tool in ("convert.tiny", "infer.py", "--batch", "serve.py", "curl", "eval.py", "train.py", "from_pretrained",
               "generate("):
    assert tool in examples, tool
  assert HUB_ID not in examples and "pip install" not in examples
  for code in [*quickstart(), *(code for _, code in readme_examples())]:  # the tests move port 8000: name it
    assert "serve.py" not in code or "--port 8000" in code, code
  readme = (ROOT / "README.md").read_text()
  skips = [line for title in README_SECTIONS for _, code in code_blocks(section(readme, title))
           for line in code.splitlines() if SKIP in line]
  assert skips and all(re.search(SKIP + r": \w", line) for line in skips), skips
  assert "\npytest " in section(readme, "Set up")  # the test command CI runs, on the front page


@functools.cache
def listed_files() -> list[str]:
  """The repository's files as a clone of this working tree has them: tracked and new, not ignored ones."""
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
  return [name for name in listed.split("\0") if name]


def _anchors(page: Path) -> set[str]:
  """The ids GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
  titles = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
  return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def _check_target(source: Path, base: Path, target: str) -> str | None:
  path, _, anchor = target.partition("#")
  page = (base / path).resolve() if path else source
  if not page.exists():
    return f"{source.relative_to(ROOT)}: {target}: no such file"
  if anchor and page.suffix == ".md" and anchor not in _anchors(page):
    return f"{source.relative_to(ROOT)}: {target}: no heading #{anchor} in {page.relative_to(ROOT)}"
  return None


def test_links_and_citations_lead_somewhere():
  """Fast: every relative link of README.md and docs/, and every `docs/<page>.md#<section>` the code and
  bench/RESULTS.md cite, names a file that exists and, with an anchor, one of its headings."""
  problems = []
  for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
      if not re.match(r"[a-z]+:", target):
        problems.append(_check_target(page, page.parent, target))
  for name in listed_files():
    source = ROOT / name
    if source.suffix in (".py", ".toml", ".md") or name == ".ci/run":
      for target in re.findall(r"\bdocs/[\w-]+\.md(?:#[\w-]+)?", source.read_text()):
        problems.append(_check_target(source, ROOT, target))
  assert not [p for p in problems if p], [p for p in problems if p]


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
  """Fresh copies of the repository as a clone of this working tree has it (tracked and new files, not
  ignored ones), and the environment they run in: a user's, with a compilation cache of its own."""
  def copy(name: str) -> Path:
    dst = tmp_path_factory.mktemp(name) / "af3-jax"
    for file in listed_files():
      if (ROOT / file).is_file():
        (dst / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, dst / file)
    return dst

  # `python` is this interpreter; one CPU device, not the suite's eight fake ones.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "AF3_VERBOSITY")}
  env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
  env["AF3_JAX_COMPILATION_CACHE"] = str(tmp_path_factory.mktemp("compilation"))
  return copy, env


def run_blocks(blocks: list[tuple[str, str]], cwd: Path, env: dict) -> None:
  with socket.socket() as s:  # a port free now, for the server's block
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  for lang, code in blocks:
    command = ["bash", "-euo", "pipefail", "-c", code.replace("8000", port)] if lang == "bash" else ["python", "-"]
    run = subprocess.run(command, cwd=cwd, env=env, input=code if lang == "python" else None,
                         stdin=None if lang == "python" else subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, f"{code}\n--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}"
    # Quiet and clean: no traceback, no library INFO line (absl's "I1204 ..." or ours).
    noise = [line for line in run.stderr.splitlines() if "Traceback" in line or re.match(r"(I\d{4} |info: )", line)]
    assert not noise, f"{code}\n{noise[:5]}"


@pytest.mark.slow
def test_the_quickstart_runs_as_written(copies):
  copy, env = copies
  clone = copy("quickstart")
  run_blocks([("bash", code) for code in quickstart()], clone, env)
  runs = clone / "runs"
  assert [json.loads(line)["id"] for line in (runs / "answers.jsonl").read_text().splitlines()] == ["q1", "q2", "q3"]
  manifest = json.loads((runs / "eval" / "manifest" / "summary.json").read_text())
  assert (manifest["items"], manifest["answered"], manifest["n"], manifest["no_reference"]) == (3, 3, 1, 2)
  assert json.loads((runs / "eval" / "mmau" / "summary.json").read_text())["items"] == 1
  assert len((runs / "train" / "metrics.jsonl").read_text().splitlines()) == 4
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (runs / "train-hf").iterdir()}
  assert (runs / "tiny-orbax" / "params").is_dir()


@pytest.mark.slow
def test_the_readme_examples_run(copies):
  copy, env = copies
  clone = copy("readme")
  subprocess.run([sys.executable, "-c", CLIP], cwd=clone, check=True)
  for name, items in INPUTS.items():
    (clone / name).write_text(json.dumps(items, indent=1))
  run_blocks(readme_examples(), clone, env)
  assert [json.loads(line)["id"] for line in (clone / "answers.jsonl").read_text().splitlines()] == ["q1", "q2", "q3"]
  runs = clone / "runs"
  assert json.loads((runs / "mmau-mini" / "summary.json").read_text())["items"] == 1
  assert len((runs / "train" / "metrics.jsonl").read_text().splitlines()) == 4
