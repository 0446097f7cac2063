"""Ask Audio Flamingo 3 about audio: one answer, an interactive chat, or a manifest in batches.

  python infer.py --audio x.wav [--audio y.mp3] [--prompt "..."] [--model PATH_OR_HUB_ID] [--think]
  python infer.py --chat [--model ...]                   # /audio PATH, /reset, /exit
  python infer.py --batch manifest.json --out results.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from absl import app, flags

import cli

if TYPE_CHECKING:  # imported for real only after the flags pass: jax takes seconds to load
  from af3_jax.assistant import Assistant
  from af3_jax.data.manifest import Sample

_MODEL = flags.DEFINE_string("model", "nvidia/audio-flamingo-3-hf", "Checkpoint folder or hub id.")
_AUDIO = flags.DEFINE_multi_string("audio", [], "Audio file(s) for a single question, in order.")
_PROMPT = flags.DEFINE_string("prompt", "Please describe the audio in detail.", "The question.")
_THINK = flags.DEFINE_bool("think", False, "Think mode: merge the checkpoint's think/ (or stage35/) adapter "
                           "and ask the model to reason before it answers.")
_MAX_NEW = flags.DEFINE_integer("max-new-tokens", 512, "At most this many new tokens (the model card allows 1024).",
                                lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature; default: generation_config.json.")
_TOP_P = flags.DEFINE_float("top-p", None, "Nucleus sampling mass; default: generation_config.json.",
                            lower_bound=0, upper_bound=1)
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding, whatever generation_config.json says.")
_DTYPE, _QUANTIZE = cli.weight_flags()
flags.adopt_module_key_flags(cli)  # --dtype, --quantize and --verbosity in --help, not only --helpfull
_STYLE = flags.DEFINE_enum("style", "hf", ["hf", "nvidia"], "Prompt style (see README).")
_CHAT = flags.DEFINE_bool("chat", False, "Interactive multi-turn chat on stdin.")
_BATCH = flags.DEFINE_string("batch", None, "An upstream-format JSON manifest to answer.")
_OUT = flags.DEFINE_string("out", None, "With --batch: the JSONL results file, one line per id (done ids skipped).")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 8, "With --batch: items decoded together (the engine's slots; an "
                                   "item takes a free slot as soon as one finishes).", lower_bound=1)
# transformers refuses a temperature of 0 too (TemperatureLogitsWarper): the logits would be divided by it.
flags.register_validator("temperature", lambda t: t is None or t > 0, "must be a positive number")


def _parse_flags(argv: list[str]) -> list[str]:
  return cli.parse_flags(flags.FLAGS, argv)


def _check_flags() -> None:
  """Refuses flag combinations and output paths that cannot work; needs neither jax nor the model."""
  if sum([bool(_AUDIO.value), _CHAT.value, _BATCH.value is not None]) != 1:
    raise ValueError("give exactly one of --audio, --chat or --batch")
  if _BATCH.value is None:
    if _OUT.value is not None:
      raise ValueError("--out goes with --batch")
    return
  if not _OUT.value:
    raise ValueError("--batch needs --out results.jsonl")
  out, manifest = Path(_OUT.value), Path(_BATCH.value)
  if out.is_dir():
    raise ValueError(f"{out}: is a folder; --out takes a results file such as {out / 'results.jsonl'}")
  if not out.parent.is_dir():
    raise ValueError(f"{out}: --out's folder {out.parent} does not exist")
  if out.exists() and manifest.exists() and out.samefile(manifest):
    raise ValueError(f"{out}: --out is the manifest itself; write the results to another file")


def _load() -> Assistant:
  """The model and processor, with the decoding flags, as an Assistant."""
  from af3_jax import assistant, weights

  model, processor = assistant.load(weights.resolve(_MODEL.value), dtype=_DTYPE.value, think=_THINK.value,
                                    style=_STYLE.value, quantize=_QUANTIZE.value)
  sampling = {"temperature": _TEMPERATURE.value, "top_p": _TOP_P.value}
  if _GREEDY.value:
    sampling["do_sample"] = False
  return assistant.Assistant(model, processor, max_new_tokens=_MAX_NEW.value, think=_THINK.value, **sampling)


def _answer(bot: Assistant, items: list[Sample] | None) -> int:
  """Answers as the mode flag says (`items`: the batch prompts); returns how many batch items failed."""
  from af3_jax import assistant

  if _AUDIO.value:
    audio = [{"type": "audio", "path": p} for p in _AUDIO.value]
    bot.reply([{"role": "user", "content": [*audio, {"type": "text", "text": _PROMPT.value}]}], sys.stdout)
    print()
    return 0
  if _CHAT.value:
    assistant.run_chat(bot, sys.stdin, sys.stdout, sys.stderr)
    return 0
  failures = assistant.run_batch(bot, items, Path(_OUT.value), _BATCH_SIZE.value)
  print(f"{failures} item(s) failed; see their 'error' lines in {_OUT.value}", file=sys.stderr)
  return failures


def run() -> int:
  """Runs the mode the flags ask for; returns the exit status. Whatever can be checked without the model
  is checked before it loads (the 8B model takes minutes)."""
  _check_flags()
  import af3_jax
  from af3_jax import assistant

  for path in _AUDIO.value:
    af3_jax.load_audio(path, max_seconds=1.0)  # a header and a second: missing or corrupt files fail now
  items = None
  if _BATCH.value is not None:
    items = assistant.batch_items(af3_jax.read_manifest(_BATCH.value), _BATCH.value)
    assistant.compact_results(Path(_OUT.value))  # mends a crash's half line; refuses a file not ours
  bot = _load()
  try:
    failures = _answer(bot, items)
  except KeyboardInterrupt:
    print(f"\ninterrupted; {bot.stats.summary()}", file=sys.stderr)
    return cli.INTERRUPTED
  print(bot.stats.summary(), file=sys.stderr)
  return 1 if failures else 0


def main(argv: list[str]) -> None:
  del argv  # _parse_flags refused anything beyond the program name
  cli.setup_logging()
  cli.exit_with(run)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
