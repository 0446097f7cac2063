"""Ask Audio Flamingo 3 about audio: one answer, an interactive chat, or a manifest in batches.

  python infer.py --audio x.wav [--audio y.mp3] [--prompt "..."] [--model PATH_OR_HUB_ID] [--think]
  python infer.py --chat [--model ...]                   # /audio PATH, /reset, /exit
  python infer.py --batch manifest.json --out results.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "nvidia/audio-flamingo-3-hf", "Checkpoint folder or hub id.")
_AUDIO = flags.DEFINE_multi_string("audio", [], "Audio file(s) for a single question, in order.")
_PROMPT = flags.DEFINE_string("prompt", "Please describe the audio in detail.", "The question.")
_THINK = flags.DEFINE_bool("think", False, "Think mode: merge the checkpoint's think/ (or stage35/) adapter "
                           "and ask the model to reason before it answers.")
_MAX_NEW = flags.DEFINE_integer("max-new-tokens", 512, "At most this many new tokens (the model card allows 1024).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature; default: generation_config.json.")
_TOP_P = flags.DEFINE_float("top-p", None, "Nucleus sampling mass; default: generation_config.json.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding, whatever generation_config.json says.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter and compute dtype.")
_STYLE = flags.DEFINE_enum("style", "hf", ["hf", "nvidia"], "Prompt style (see README).")
_CHAT = flags.DEFINE_bool("chat", False, "Interactive multi-turn chat on stdin.")
_BATCH = flags.DEFINE_string("batch", None, "An upstream-format JSON manifest to answer.")
_OUT = flags.DEFINE_string("out", None, "With --batch: the JSONL results file (appended; done ids skipped).")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 8, "With --batch: items per generate call.")


def _adapter(root: Path) -> Path:
  for name in ("think", "stage35"):
    if (root / name / "adapter_config.json").is_file():
      return root / name
  raise ValueError(f"{root}: --think needs a think/ or stage35/ adapter folder beside the weights")


def run() -> int:
  import jax.numpy as jnp

  import af3_jax
  from af3_jax import assistant, weights

  modes = [bool(_AUDIO.value), _CHAT.value, _BATCH.value is not None]
  if sum(modes) != 1:
    raise ValueError("give exactly one of --audio, --chat or --batch")
  if _BATCH.value is not None and not _OUT.value:
    raise ValueError("--batch needs --out results.jsonl")
  samples = af3_jax.read_manifest(_BATCH.value) if _BATCH.value else None
  root = weights.resolve(_MODEL.value)
  dtype = jnp.dtype(_DTYPE.value)
  model = af3_jax.from_pretrained(root, dtype=dtype, adapter=_adapter(root) if _THINK.value else None)
  sampling = {"temperature": _TEMPERATURE.value, "top_p": _TOP_P.value}
  if _GREEDY.value:
    sampling["do_sample"] = False
  bot = assistant.Assistant(model, af3_jax.Processor.from_pretrained(root, style=_STYLE.value),
                            max_new_tokens=_MAX_NEW.value, think=_THINK.value, **sampling)
  failures = 0
  if _AUDIO.value:
    items = [{"type": "audio", "path": p} for p in _AUDIO.value]
    bot.reply([{"role": "user", "content": [*items, {"type": "text", "text": _PROMPT.value}]}], sys.stdout)
    print()
  elif _CHAT.value:
    assistant.run_chat(bot, sys.stdin, sys.stdout, sys.stderr)
  else:
    failures = assistant.run_batch(bot, samples, Path(_OUT.value), _BATCH_SIZE.value)
    print(f"{failures} item(s) failed; see their 'error' lines in {_OUT.value}", file=sys.stderr)
  print(bot.stats.summary(), file=sys.stderr)
  return 1 if failures else 0


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    code = run()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    code = 1
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
