"""cli.py, what the command-line programs share: positional arguments, and quiet logs (libraries' INFO
lines hidden unless --verbosity or $AF3_VERBOSITY asks for them; warnings as one `warning:` line)."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT


# A program on its own flags, as eval.py and serve.py are, that logs what the libraries log.
PROGRAM = """
import logging, sys, warnings
from absl import flags, logging as absl_logging
import cli

def run(name):
  logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
  absl_logging.info("orbax: saving step 1")
  logging.getLogger("af3_jax.training.pipeline").warning("skipping sample %s:\\n  unreadable", name)
  warnings.warn("clip.wav: the header promises 3.0 s,\\nthe file holds 1.0 s")
  print("answer")
  return 0

cli.main(flags.FlagValues(), "doc", sys.argv, run, args=["NAME"])
"""


def program(*args, env=None):
  run = subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
  return run.returncode, run.stdout, run.stderr.splitlines()


def test_library_info_is_hidden_and_warnings_are_one_line():
  code, out, err = program("s1")
  assert (code, out) == (0, "answer\n")
  assert err == ["warning: skipping sample s1: unreadable",
                 "warning: clip.wav: the header promises 3.0 s, the file holds 1.0 s"]


@pytest.mark.parametrize("how", [["--verbosity", "0"], "env"])
def test_verbosity_shows_the_info_lines(how):
  args, env = (how, None) if how != "env" else ([], {"AF3_VERBOSITY": "0"})
  code, _, err = program("s1", *args, env=env)
  assert code == 0
  assert err[:3] == ["info: jax._src.xla_bridge: Unable to initialize backend 'tpu'", "info: absl: orbax: saving step 1",
                     "warning: af3_jax.training.pipeline: skipping sample s1: unreadable"]


@pytest.mark.parametrize("args, env, message", [
    ([], None, "error: give NAME (see --help)"),
    (["a", "b"], None, "error: unexpected arguments: b"),
    (["a"], {"AF3_VERBOSITY": "loud"}, "error: AF3_VERBOSITY='loud': must be an integer (-1, 0 or 1)"),
])
def test_arguments_and_settings_refused_in_one_line(args, env, message):
  assert program(*args, env=env) == (1, "", [message])


def test_serve_writes_out_the_engines_decode_steps():
  """serve.py states --num-scheduler-steps' default as a number, so that --help loads no jax: it must be
  the engine's own."""
  import serve
  from af3_jax.inference import engine

  assert serve.FLAGS["num-scheduler-steps"].default == engine.DECODE_STEPS
