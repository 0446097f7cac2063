"""eval.py's speed on an MMAU-test-mini-sized run: the engine's decode slots against one item at a time,
in one run.

  python bench/bench_eval.py               # 1,000 items of 10-30 s synthetic audio, tiny model, CPU
  python bench/bench_eval.py --items 50    # a smaller run
  (from the repo root, with af3_jax installed or PYTHONPATH=.)

Both passes answer the same synthetic file in MMAU's format (a noise clip of 10-30 s per item, as
test-mini has one clip per question) through what eval.py runs (`runner.Run`, `runner.answer`, the
NVIDIA prompt style, the continuous-batching engine), differing only in the engine's decode slots (1:
one item at a time). The model has random weights (the
"tiny" preset) and no eos (it has no generation_config.json), so no answer ends early: every item decodes exactly
--new-tokens tokens and the work per item is fixed. Times run from the first request to the last
answer, jit compiles included, as in eval.py's summary; RTFx is seconds of audio per second of wall time.
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
from absl import app, flags

from af3_jax.checkpoints.pretrained import init_random
from af3_jax.data.processor import Processor
from af3_jax.evaluation import runner, tasks
from af3_jax.hlo import compiles
from af3_jax.inference.assistant import Assistant
from presets import MODELS, with_tokenizer

_ITEMS = flags.DEFINE_integer("items", 1000, "Items (MMAU test-mini has 1,000).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch-size", 8, "Decode slots of the engine in the batched pass (eval.py's default).",
                              lower_bound=2)
_NEW = flags.DEFINE_integer("new-tokens", 8, "Tokens every answer decodes.", lower_bound=1)
_SECONDS = flags.DEFINE_multi_float("seconds", [10.0, 30.0], "The clips' shortest and longest duration.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"],
                           "Parameter and compute dtype (XLA:CPU runs bfloat16 dots slower).")

def write_benchmark(folder: Path, n: int, seconds: tuple[float, float], seed: int = 0) -> Path:
  """mmau-test-mini.json with `n` four-choice questions, each on its own clip of uniform duration."""
  rng = np.random.default_rng(seed)
  (folder / "audios").mkdir()
  items = []
  for i in range(n):
    clip = folder / "audios" / f"{i}.wav"
    sf.write(clip, 0.1 * rng.standard_normal(int(rng.uniform(*seconds) * 16000)).astype(np.float32), 16000)
    items.append({"id": f"q{i}", "audio_id": f"./audios/{i}.wav", "question": "Which source makes this sound?",
                  "choices": ["A man", "A woman", "A child", "A robot"], "answer": "A man", "task": "sound",
                  "category": "Reasoning", "sub-category": "Acoustic Source Inference", "difficulty": "easy"})
  path = folder / "mmau-test-mini.json"
  path.write_text(json.dumps(items))
  return path


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if len(_SECONDS.value) != 2 or not 0 < _SECONDS.value[0] <= _SECONDS.value[1] <= 30:
    print("--seconds takes a shortest and a longest duration, 0 < shortest <= longest <= 30", file=sys.stderr)
    return 1
  cfg, tokenizer = with_tokenizer(MODELS["tiny"])
  bot = Assistant(init_random(cfg, dtype=jnp.dtype(_DTYPE.value)), Processor(tokenizer, style="nvidia"),
                  max_new_tokens=_NEW.value, do_sample=False)
  header = (f"tiny AF3 (random weights), {_DTYPE.value}, {_ITEMS.value} items of {_SECONDS.value[0]:g}-"
            f"{_SECONDS.value[1]:g} s audio, {_NEW.value} new tokens each | JAX {jax.__version__} on "
            f"{jax.devices()[0].device_kind} | {datetime.datetime.now().isoformat(timespec='minutes')}")
  print(header, flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    data = write_benchmark(Path(tmp), _ITEMS.value, tuple(_SECONDS.value))
    bench = tasks.load("mmau", data)
    for name, size in (("one at a time", 1), (f"batches of {_BATCH.value}", _BATCH.value)):
      run = runner.Run(Path(tmp) / f"batch{size}", bench, {"task": "mmau", "batch_size": size})
      with compiles() as compiled:
        session = run.answer(run.todo(0, 1), lambda prompts, size=size: runner.answer(bot, prompts, size))
      speed = runner.combined([session])
      rows.append((name, speed, len(compiled)))
      print(f"{name}: {speed['items']} items in {speed['wall_s']:.1f} s", flush=True)
  print(f"\n{header}\n| loop | items | wall s | items/s | audio s | RTFx | programs compiled |")
  print("|---|---|---|---|---|---|---|")
  for name, s, programs in rows:
    print(f"| {name} | {s['items']} | {s['wall_s']:.1f} | {s['items_per_s']:.2f} | {s['audio_s']:.0f} | "
          f"{s['rtfx']:.1f} | {programs} |")
  print(f"batches of {_BATCH.value}: {rows[1][1]['items_per_s'] / rows[0][1]['items_per_s']:.2f}x the items/s "
        "of one at a time")
  return 0


if __name__ == "__main__":
  app.run(main)
