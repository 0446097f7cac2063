"""Test setup and fixtures: 8 fake CPU devices, float32 at highest matmul precision, tiny random AF3
checkpoints, and the files the program tests share (clips, an MMAU set, a training manifest). Helpers
the tests import are in helpers/ (by noun) and programs.py.

The checkpoints are written by `af3_jax.checkpoints.tiny` (what `python -m convert.tiny` writes for
users), whose every tensor is drawn at random (biases and norm weights included), so a wrong transpose,
bias or norm cannot hide behind an init of zeros and ones; PyTorch's reference model is transformers' model
built from that folder's config.json holding all its tensors (`helpers.reference.torch_model_of`). transformers' own tester config is built by transformers and redrawn
alike.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("AF3_JAX_COMPILATION_CACHE", "off")  # the CLIs run here keep nothing in the user's cache

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
from helpers import CHOICES, CLIPS  # noqa: E402
from helpers.reference import build_torch_model, torch_model_of, write_nvidia_layout  # noqa: E402
from helpers.tiny import MUSIC, TINY, Checkpoint, Tester  # noqa: E402

import af3_jax  # noqa: E402
from af3_jax.checkpoints import tiny as tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session", params=TINY, ids=lambda t: t.name)
def ckpt(request, tmp_path_factory) -> Checkpoint:
  pytest.importorskip("torch")
  tiny = request.param
  root = tmp_path_factory.mktemp(tiny.name)
  model = torch_model_of(tiny.write(root / "tree"))
  model.save_pretrained(root / "hf", max_shard_size="100KB")
  write_nvidia_layout(model, root / "nvidia")
  return Checkpoint(tiny, model, root / "hf", root / "tree", root / "nvidia")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
  """The first tiny shape as `convert.tiny` writes it (tokenizer, chat template and processor config
  included), without generation defaults (`Tiny.write`)."""
  return TINY[0].write(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="session")
def gqa_ckpt(model_dir, tmp_path_factory) -> Checkpoint:
  """Only the first tiny config, for tests that need one checkpoint, not each: `model_dir`'s model, and
  the same saved by transformers."""
  pytest.importorskip("torch")
  model = torch_model_of(model_dir)
  root = tmp_path_factory.mktemp("single")
  model.save_pretrained(root / "hf")
  return Checkpoint(TINY[0], model, root / "hf", model_dir, root / "nvidia")


@pytest.fixture(scope="session")
def tester_ckpt(tmp_path_factory) -> Checkpoint:
  """transformers' tester config (`Tester`), saved by `save_pretrained` (hf only)."""
  pytest.importorskip("torch")
  tester = Tester()
  model = build_torch_model(tester, seed=0)  # this draw's greedy answers vary (test_generate needs them to)
  root = tmp_path_factory.mktemp(tester.name)
  model.save_pretrained(root / "hf")
  return Checkpoint(tester, model, root / "hf", root / "tree", root / "nvidia")


@pytest.fixture(scope="session")
def music_model_dir(tmp_path_factory) -> Path:
  """The tiny Music Flamingo (`MUSIC`) as `convert.tiny --model-type musicflamingo` writes it, without
  generation defaults (`Tiny.write`)."""
  return MUSIC.write(tmp_path_factory.mktemp("music_cli") / "model")


@pytest.fixture(scope="session")
def music_ckpt(music_model_dir, tmp_path_factory) -> Checkpoint:
  """`music_model_dir`'s model, and the same saved by transformers (no NVIDIA layout)."""
  pytest.importorskip("torch")
  model = torch_model_of(music_model_dir)
  root = tmp_path_factory.mktemp(MUSIC.name)
  model.save_pretrained(root / "hf")
  return Checkpoint(MUSIC, model, root / "hf", music_model_dir, root / "nvidia")


@pytest.fixture(scope="module")
def music_loaded(music_ckpt) -> af3_jax.Model:
  """Our float32 copy of `music_ckpt`."""
  return af3_jax.from_pretrained(music_ckpt.hf, dtype=jnp.float32)


@pytest.fixture(scope="module")
def loaded(ckpt) -> af3_jax.Model:
  """Our float32 copy of each tiny checkpoint."""
  return af3_jax.from_pretrained(ckpt.hf, dtype=jnp.float32)


@pytest.fixture(scope="module")
def gqa_loaded(gqa_ckpt) -> af3_jax.Model:
  """Our float32 copy of the single `gqa_ckpt`."""
  return af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """The tiny checkpoints' tokenizer alone (`tiny_checkpoint.tokenizer`): byte-level BPE, `<sound>` id 299."""
  path = tmp_path_factory.mktemp("tokenizer")
  tiny_checkpoint.tokenizer(TINY[0].vocab).save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def music_tokenizer_dir(tmp_path_factory):
  """The tiny Music Flamingo's tokenizer alone: its audio bos/eos are ids 297 and 298 (`MUSIC`'s)."""
  path = tmp_path_factory.mktemp("music_tokenizer")
  tiny_checkpoint.tokenizer(MUSIC.vocab, music=True).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def mmau(tmp_path_factory):
  """mmau-test-mini.json with 7 questions on 4 clips of 1 to 2.5 s (q0 and q1 share clip 0, q5 and q6
  clip 3; q4's clip is missing), beside test-mini-audios/ as the dataset ships."""
  folder = tmp_path_factory.mktemp("mmau")
  (folder / "test-mini-audios").mkdir()
  rng = np.random.default_rng(0)
  for clip, seconds in enumerate((1.0, 1.5, 2.5, 2.0)):
    sf.write(folder / "test-mini-audios" / f"clip{clip}.wav", 0.1 * rng.standard_normal(int(seconds * 16000)), 16000)
  clips = [0, 0, 1, 2, "missing", 3, 3]
  items = [{"id": f"q{i}", "audio_id": f"./test-mini-audios/clip{c}.wav", "question": f"Question {i}?",
            "choices": CHOICES[i % 4], "answer": CHOICES[i % 4][i % 2], "dataset": "synthetic",
            "task": ("sound", "music", "speech")[i % 3], "split": "test-mini", "category": "Reasoning",
            "sub-category": "Counting", "difficulty": ("easy", "medium", "hard")[i % 3]} for i, c in enumerate(clips)]
  (folder / "mmau-test-mini.json").write_text(json.dumps(items))
  return folder / "mmau-test-mini.json", items


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  folder = tmp_path_factory.mktemp("clips")
  rng = np.random.default_rng(0)
  for name, seconds in (("a.wav", 3.0), ("b.flac", 6.5)):
    sf.write(folder / name, 0.2 * rng.standard_normal(int(seconds * 16000)), 16000)
  (folder / "broken.wav").write_bytes(b"RIFF not really")
  return folder


@pytest.fixture(scope="session")  # the serving tests' server (package scoped) reads files from it
def media(tmp_path_factory):
  folder = tmp_path_factory.mktemp("media")
  rng = np.random.default_rng(0)
  for name, seconds in CLIPS.items():
    sf.write(folder / name, 0.2 * rng.standard_normal(int(seconds * 16000)), 16000)
  return folder


@pytest.fixture(scope="module")
def run_setup(model_dir, tmp_path_factory):
  """(checkpoint with tokenizer, manifest of 8 short clips with answers, manifest with a corrupt file)."""
  root = tmp_path_factory.mktemp("train")
  model = root / "model"
  shutil.copytree(model_dir, model)
  rng = np.random.default_rng(0)
  items = []
  for i in range(8):
    path = root / f"clip{i}.wav"
    sf.write(path, 0.3 * rng.standard_normal(int((1.0 + i / 4) * 16000)), 16000)
    answer = ["A dog barking.", "Music plays.", "Someone speaks.", "Rain falls."][i % 4]
    items.append({"id": f"c{i}", "sound": str(path),
                  "conversations": [{"from": "human", "value": "<sound>\nWhat is in this audio?"},
                                    {"from": "gpt", "value": answer}]})
  manifest = root / "train.json"
  manifest.write_text(json.dumps(items))
  (root / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
  corrupt = root / "corrupt.json"
  corrupt.write_text(json.dumps(items[:3] + [{**items[3], "id": "bad", "sound": str(root / "broken.wav")}]))
  return model, manifest, corrupt
