"""Ask Audio Flamingo 3 about audio: one answer, an interactive chat, or a manifest in batches.

  python infer.py --audio x.wav [--audio y.mp3] [--prompt "..."] [--model PATH_OR_HUB_ID] [--think]
  python infer.py --prompt "..."                          # a question without audio
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
_PROMPT = flags.DEFINE_string("prompt", "Please describe the audio in detail.", "The question; alone (without "
                              "--audio), a question about no audio.")
_THINK = flags.DEFINE_bool("think", False, "Think mode: merge the checkpoint's think/ (or stage35/) adapter "
                           "and ask the model to reason before it answers.")
_MAX_NEW = flags.DEFINE_integer("max-new-tokens", 512, "At most this many new tokens (the model card allows 1024).",
                                lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature, 0 for greedy (as --greedy, and as the "
                                  "server takes it); default: generation_config.json.", lower_bound=0)
_TOP_P = flags.DEFINE_float("top-p", None, "Nucleus sampling mass; default: generation_config.json.",
                            lower_bound=0, upper_bound=1)
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding, whatever generation_config.json says.")
_DTYPE, _QUANTIZE = cli.weight_flags()
_CACHE = cli.compilation_cache_flag()
flags.adopt_module_key_flags(cli)  # --dtype, --quantize and --verbosity in --help, not only --helpfull
_STYLE = flags.DEFINE_enum("style", "hf", ["hf", "nvidia"], "Prompt style (see docs/inference.md).")
_CHAT = flags.DEFINE_bool("chat", False, "Interactive multi-turn chat on stdin.")
_BATCH = flags.DEFINE_string("batch", None, "An upstream-format JSON manifest to answer.")
_OUT = flags.DEFINE_string("out", None, "With --batch: the JSONL results file, one line per id (done ids skipped).")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 8, "With --batch: items decoded together (the engine's slots; an "
                                   "item takes a free slot as soon as one finishes).", lower_bound=1)


def _parse_flags(argv: list[str]) -> list[str]:
  return cli.parse_flags(flags.FLAGS, argv)


def _check_flags() -> None:
  """Refuses flag combinations and output paths that cannot work; needs neither jax nor the model."""
  question = bool(_AUDIO.value) or flags.FLAGS["prompt"].present
  if sum([question, _CHAT.value, _BATCH.value is not None]) != 1:
    raise ValueError("give one of --audio (with --prompt, or not), --prompt alone (a question without audio), "
                     "--chat or --batch")
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

  root = weights.resolve(_MODEL.value)
  with cli.loading(f"{root} ({cli.weights_label(_DTYPE.value, _QUANTIZE.value, _THINK.value)})"):
    model, processor = assistant.load(root, dtype=_DTYPE.value, think=_THINK.value, style=_STYLE.value,
                                      quantize=_QUANTIZE.value)
  cli.note("each new prompt size compiles once, before its first answer")
  return assistant.Assistant(model, processor, max_new_tokens=_MAX_NEW.value, think=_THINK.value, **_sampling())


def _sampling() -> dict:
  """The decoding flags as `generate`'s arguments (None: generation_config.json's); a temperature of 0 is
  greedy, as in OpenAI's API."""
  sampling = {"temperature": _TEMPERATURE.value or None, "top_p": _TOP_P.value}
  if _GREEDY.value or _TEMPERATURE.value == 0:
    sampling["do_sample"] = False
  return sampling


def _answer(bot: Assistant, items: list[Sample] | None) -> int:
  """Answers as the mode flag says (`items`: the batch prompts); returns the exit status."""
  from af3_jax import assistant

  if _CHAT.value:
    cli.note(f"ready to chat: {assistant.CHAT_HELP}")
    terminal = getattr(sys.stdin, "isatty", lambda: False)()  # a prompt to type at, not in piped output
    assistant.run_chat(bot, sys.stdin, sys.stdout, sys.stderr, prompt="> " if terminal else "")
    return 0
  if _BATCH.value is None:
    audio = [{"type": "audio", "path": p} for p in _AUDIO.value]
    bot.reply([{"role": "user", "content": [*audio, {"type": "text", "text": _PROMPT.value}]}], sys.stdout)
    print()
    return 0
  failures = assistant.run_batch(bot, items, Path(_OUT.value), _BATCH_SIZE.value)
  cli.note(_batch_outcome(len(items), failures))
  return 1 if failures else 0


def _batch_outcome(items: int, failures: int) -> str:
  if failures:
    return (f"{failures} of {items} item(s) failed (see their 'error' lines in {_OUT.value}); rerun the same "
            "command to retry them")
  return f"all {items} item(s) answered, in {_OUT.value}"


def run() -> int:
  """Runs the mode the flags ask for; returns the exit status: 0, or 1 when a batch item has no answer
  (also when a rerun finds it so). Whatever can be checked without the model is checked before it
  loads (the 8B model takes minutes), and a batch whose every item is answered does not load it."""
  _check_flags()
  cli.use_compilation_cache(_CACHE.value)
  import af3_jax
  from af3_jax import assistant

  for path in _AUDIO.value:
    af3_jax.load_audio(path, max_seconds=1.0)  # a header and a second: missing or corrupt files fail now
  items = None
  if _BATCH.value is not None:
    items = assistant.batch_items(af3_jax.read_manifest(_BATCH.value), _BATCH.value)
    # Mends a crash's half line, puts the lines in manifest order; refuses a file not ours.
    answered = assistant.compact_results(Path(_OUT.value), [s.id for s in items])
    if all(s.id in answered for s in items):
      cli.note(f"{_batch_outcome(len(items), 0)}; nothing to do")
      return 0
  bot = _load()
  try:
    code = _answer(bot, items)
  except KeyboardInterrupt:
    print(f"\ninterrupted; {bot.stats.summary()}", file=sys.stderr)
    return cli.INTERRUPTED
  print(bot.stats.summary(), file=sys.stderr)
  return code


def main(argv: list[str]) -> None:
  del argv  # _parse_flags refused anything beyond the program name
  cli.setup_logging()
  cli.exit_with(run)


if __name__ == "__main__":
  cli.process(lambda: app.run(main, flags_parser=_parse_flags))
