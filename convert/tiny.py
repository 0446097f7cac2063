"""Writes a tiny random checkpoint that every tool takes (infer.py, serve.py, eval.py, train.py's
--config.init_from, the converters): try them without the released weights, offline, in seconds.

  python -m convert.tiny OUT [--think] [--model-type=audioflamingo3|musicflamingo] [--seed=0]

OUT gets what the HF release of AF3 (or Music Flamingo) holds, at a tiny size (2 + 2 layers, a 300-token
vocabulary): config.json, model.safetensors, the tokenizer with its chat template, the processor's config
and generation_config.json (the release's sampling settings); with --think, a random think-mode adapter in
OUT/think. The weights are random: answers are strings of random tokens. An existing OUT is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

import cli
from af3_jax.checkpoints import tiny

FLAGS = flags.FlagValues()
_MODEL_TYPE = flags.DEFINE_enum("model-type", "audioflamingo3", list(tiny.MODEL_TYPES), "The model family to write.",
                                flag_values=FLAGS)
_THINK = flags.DEFINE_bool("think", False, "Also write a random think-mode LoRA adapter in OUT/think.",
                           flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.", lower_bound=0, flag_values=FLAGS)


def run(out: Path) -> int:
  tiny.write(out, model_type=_MODEL_TYPE.value, seed=_SEED.value, think=_THINK.value)
  family = {"audioflamingo3": "AF3", "musicflamingo": "Music Flamingo"}[_MODEL_TYPE.value]
  print(f"wrote {out}: a tiny {family} with random weights{' and a think adapter' if _THINK.value else ''}")
  return 0


def main(argv: list[str]) -> None:
  cli.main(FLAGS, __doc__, argv, lambda out: run(Path(out)), args=["OUT"])


if __name__ == "__main__":
  cli.process(lambda: main(sys.argv))
