"""`init_random` (random weights born sharded), and `bench/bench_infer.py`, `bench/bench_train.py`,
`bench/bench_eval.py`, `bench/bench_serve.py` and `bench/bench_compile.py` end to end at tiny size.

No timings are checked: the bench only has to run and print its table.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from helpers import ROOT
from helpers.tiny import TINY

from af3_jax import sharding
from af3_jax.checkpoints.pretrained import abstract_model, init_random

CFG = TINY[0].config()  # the gqa shape (helpers.tiny)


def run_bench(script: str, args: list[str], timeout: int = 300) -> list[str]:
  """The lines `bench/<script>` prints, run with this checkout's af3_jax first on the path (whichever
  one pip installed); fails with its stderr's end if it exits non-zero."""
  run = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout.strip().splitlines()


def test_init_random_is_born_sharded():
  mesh = sharding.make_mesh((1, 4, 2))
  model = init_random(CFG, mesh=mesh)
  _, abstract, _ = abstract_model(CFG, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16, mesh=mesh)
  flat, shapes = (traverse_util.flatten_dict(nnx.to_pure_dict(s)) for s in (model.state, abstract))
  assert flat.keys() == shapes.keys()
  for path, x in flat.items():
    assert x.shape == shapes[path].shape and x.dtype == jnp.bfloat16
    if path[-1] in ("kernel", "embedding") and "conv" not in path[-2] and path[-2] != "embed_positions":
      # Every matmul weight and the token table: each of the 8 devices holds an eighth (fsdp x tensor).
      assert [s.data.size * 8 for s in x.addressable_shards] == [x.size] * 8, ("/".join(path), x.sharding.spec)
  assert len(model.state["lm_head"]["kernel"][...].sharding.device_set) == 8
  assert model.path is None
  logits = model(input_ids=np.random.default_rng(0).integers(0, 299, (2, 7)))
  assert logits.shape == (2, 7, 300) and logits.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(logits, np.float32)).all()


def infer_bench_rows(args: list[str]) -> list[str]:
  """What `bench/bench_infer.py` prints with `args`, from its table's rows on."""
  lines = run_bench("bench_infer.py", args)
  header = next(i for i, line in enumerate(lines) if line.startswith("| audio | batch |"))
  return lines[header + 2:]


def test_bench_runs_at_tiny_size():
  pytest.importorskip("torch")
  # One cell (30 s, batch 2) and 4 tokens, JAX with its projections as loaded and fused: most of the time
  # is JAX compiling its three programs for each. Issue 21's figures follow, "-" for cells not run.
  args = ["--size", "tiny", "--new-tokens", "4", "--batch", "2", "--projections", "separate", "--projections", "fused"]
  rows = infer_bench_rows(args)
  assert rows[0].startswith("| 30s | 2 | bfloat16 separate | "), rows
  assert rows[1].startswith("| 30s | 2 | bfloat16 fused | "), rows
  figures = rows[rows.index("") + 1:]
  assert figures[0] == "| figure | transformers | JAX bfloat16 separate | JAX bfloat16 fused |", rows
  assert figures[2].startswith("| decode batch 1, tok/s (`generate` loop) | - | - | - |")
  # generate and generate_stream share their two programs: the start and the decode step.
  assert figures[-2].startswith("| programs compiled (seconds) | - | 2 (") and figures[-2].count("2 (") == 2


@pytest.mark.slow  # about 30 s on 2 cores, mostly compiling
def test_bench_runs_music_flamingo_at_tiny_size():
  pytest.importorskip("torch")
  rows = infer_bench_rows(["--size", "tiny", "--model-type", "musicflamingo", "--new-tokens", "4", "--batch", "1"])
  assert rows[0].startswith("| 30s | 1 | bfloat16 separate | "), rows


def test_train_bench_runs_at_tiny_size():
  pytest.importorskip("torch")
  args = ["--size", "tiny", "--stage", "projector", "--steps", "1", "--batch", "1"]
  lines = run_bench("bench_train.py", args)
  # Stage 1's rows: one 30 s window and its prompt each.
  assert lines[-3].startswith("| stage | trainable | rows x tokens |")
  assert lines[-1].startswith("| projector | ") and "| 1 x 774 |" in lines[-1]


def test_eval_bench_runs_at_tiny_size():
  # 2 one-second items, 2 new tokens: both passes and their table, nothing timed.
  args = ["--items", "2", "--new-tokens", "2", "--batch-size", "2", "--seconds", "1", "--seconds", "1"]
  lines = run_bench("bench_eval.py", args)
  assert lines[-5].startswith("| loop | items |") and lines[-3].startswith("| one at a time | 2 | ")
  assert lines[-2].startswith("| batches of 2 | 2 | ") and lines[-1].startswith("batches of 2: ")


@pytest.mark.slow  # minutes on 2 cores: the server warms up in full, then the engine alone runs three ways
def test_serve_bench_runs_at_test_size():
  pytest.importorskip("torch")
  args = ["--size", "test", "--clients", "1", "--clients", "2", "--requests", "1", "--new-tokens", "2",
          "--max-slots", "2", "--dtype", "float32"]
  lines = run_bench("bench_serve.py", args, timeout=600)
  server = lines.index(next(x for x in lines if x.startswith("| clients | requests |")))
  assert lines[server + 2].startswith("| 1 | 1 | ") and lines[server + 3].startswith("| 2 | 2 | ")
  assert lines[-5] == "| engine | out tok/s |" and lines[-3].startswith("| one request a prefill")
  assert lines[-1].startswith("| requests prefilled together, 8 tokens a dispatch (multi-step) | ")


def test_compile_bench_runs_at_test_size():
  """Its GPU figures need the accelerators extra; on the CPU it compiles the same programs."""
  args = ["--target", "cpu", "--size", "test", "--program", "decode", "--layout", "unrolled", "--layout", "rolled"]
  lines = run_bench("bench_compile.py", args)
  assert lines[-4].startswith("| program | layout |")
  assert lines[-2].startswith("| decode | unrolled | ") and lines[-1].startswith("| decode | rolled | ")
