"""Memory plans for an accelerator that is not here: `train.py --compile_only --target` and
`bench/bench_memory.py --target` compile with the target's own compiler (GPU: XLA's CUDA pipeline for
the card's spec; TPU: libtpu) and print its plan per device. Those marked `accelerator` need the
`accelerators` extra; without it, a target is one line naming the extra."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from af3_jax import targets
from af3_jax.config import AF3Config

BENCH = ROOT / "bench" / "bench_memory.py"
# Each plan runs in its own process (the accelerator's compiler registers before jax starts a backend),
# with this checkout's af3_jax, and no fake CPU devices: a target brings its own.
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": str(ROOT)}


def plan(config: str, init_from: Path, workdir: Path, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "train.py", f"--config={config}", f"--config.init_from={init_from}",
                         f"--workdir={workdir}", *flags], capture_output=True, text=True, cwd=ROOT, env=ENV)


@pytest.fixture
def full_config(tmp_path) -> Path:
  """A folder holding only the released AF3's config.json: all a plan reads."""
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "config.json").write_text(json.dumps(AF3Config().to_hf_dict()))
  return tmp_path / "full"


def error_line(run: subprocess.CompletedProcess) -> str:
  """The one line a CLI's bad input prints (and nothing else on stderr, no traceback)."""
  assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
  [line] = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
  return line


@pytest.mark.parametrize("flags, expected", [
    (["--compile_only", "--target=h900"], "unknown target 'h900': use h100, h200 or a100"),
    (["--compile_only", "--target=v5p-6"], "no v5p slice of 6 TensorCores"),
    (["--target=h100-8"], "--target names the accelerator a memory plan is for: use it with --compile_only"),
])
def test_a_bad_target_is_one_line(full_config, tmp_path, flags, expected):
  assert expected in error_line(plan("configs/stage5.py", full_config, tmp_path / "w", *flags))
  assert not (tmp_path / "w").exists()


def test_without_the_accelerators_extra_a_target_names_it(full_config, tmp_path, monkeypatch):
  """In this process with its compiler hidden (the default environment has none: then through the CLI too)."""
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
  with pytest.raises(ValueError, match=r"--target v5p-8 needs libtpu, which is not installed: pip install "
                                       r"'af3-jax\[accelerators\]'"):
    targets.compile_only("v5p-8")
  if find_spec("jax_cuda12_plugin") is None:
    line = error_line(plan("configs/stage5.py", full_config, tmp_path / "w", "--compile_only", "--target=h100-8"))
    assert line == ("error: --target h100-8 needs jax's CUDA plugin, which is not installed: pip install "
                    "'af3-jax[accelerators]' (or `pip install -e '.[accelerators]'` in a checkout)")
    line = error_line(subprocess.run([sys.executable, BENCH, "--target=h100"], capture_output=True, text=True,
                                     cwd=ROOT, env=ENV))
    assert "--target h100 needs jax's CUDA plugin" in line


@pytest.mark.accelerator
@pytest.mark.parametrize("target, kind, dtype", [
    # bfloat16, the stages' compute dtype: cuDNN attention on the GPU (its key masks as lengths), the
    # splash kernel on the TPU.
    ("h100-8", "8 x NVIDIA H100 80GB HBM3 (79.1 GiB each)", "bfloat16"),
    ("v5p-16", "8 x TPU v5 (95.0 GiB each)", "bfloat16"),
])
def test_compile_only_plans_each_device_of_a_target(gqa_ckpt, tmp_path, target, kind, dtype):
  """The tiny checkpoint's stage-5 step on 8 devices of the target, one length: the target's devices,
  the config's mesh over them, and each device's plan against its memory."""
  run = plan("configs/tiny.py:5", gqa_ckpt.hf, tmp_path / "w", "--compile_only", f"--target={target}",
             "--config.data.max_length=256", f"--config.compute_dtype={dtype}")
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"{target}: {kind}; mesh {{'data': 1, 'fsdp': 8, 'tensor': 1}}" in run.stdout
  [entry] = json.loads((tmp_path / "w" / "memory.json").read_text())
  assert entry["length"] == 256 and 0 < entry["arguments_gib"] < entry["peak_gib"] < 1
  assert entry["device_gib"] == targets.parse(target).hbm_bytes / 2**30 and entry["headroom"] > 0.99
  assert f"length    256: arguments {entry['arguments_gib']:.2f} GiB" in run.stdout


@pytest.mark.slow
@pytest.mark.accelerator
@pytest.mark.parametrize("target", ["h100-8", "v5p-8"])
def test_stage5_at_full_size_fits_the_target_with_a_tenth_to_spare(full_config, tmp_path, target):
  """The released AF3's stage 5 at its upstream batch, longest length: the heaviest step of the curriculum
  (bench/RESULTS.md has every stage and length) leaves at least 10 % of each device free."""
  run = plan("configs/stage5.py", full_config, tmp_path / "w", "--compile_only", f"--target={target}",
             "--config.data.length_buckets=(8192,)")
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  [entry] = json.loads((tmp_path / "w" / "memory.json").read_text())
  assert entry["headroom"] >= 0.1, entry


@pytest.mark.slow
@pytest.mark.accelerator
def test_a_ten_minute_prefill_in_int8_fits_a_16_gb_chip():
  """v5e's 16 GB of HBM, whose compiler refuses any program that does not fit: 10 minutes of audio
  (15,036 prompt tokens), the released AF3 with int8 decoder weights, prefill and a decode step."""
  run = subprocess.run([sys.executable, BENCH, "--size=full", "--dtype=bfloat16", "--quantize=int8", "--minutes=10",
                        "--target=v5e-1"], capture_output=True, text=True, cwd=ROOT, env=ENV)
  assert run.returncode == 0, run.stderr[-3000:]
  row = run.stdout.strip().splitlines()[-1]
  assert row.startswith("| 10 min | 15,036 (16,384) |") and "does not fit" not in row, row
