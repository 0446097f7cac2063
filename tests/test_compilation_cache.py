"""The persistent compilation cache the CLIs turn on (`cli.use_compilation_cache`): where it goes, how it
is moved or turned off, and that a second process compiles nothing (jax's compile events, counted in
the child process by bench/counting.py: every compile is a cache hit)."""

import os
import subprocess
import sys

import jax
import pytest
from helpers import ROOT

import cli

SETTINGS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
# Small, quick programs, which jax's default thresholds would not keep.
PROGRAM = """
import sys
import cli
cli.use_compilation_cache(sys.argv[1])
import jax, jax.numpy as jnp
print(float(jax.jit(lambda x: jnp.sin(x).sum())(jnp.arange(3.0))), jax.jit(lambda x: x * 2)(3))
"""


def counted(args: list[str], env: dict | None = None, timeout: float = 300) -> tuple:
  """Runs `python args...` under bench/counting.py; the process and its (compiles, misses, hits)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
  run = subprocess.run([sys.executable, str(ROOT / "bench" / "counting.py"), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=env)
  line = next(x for x in run.stderr.splitlines() if x.startswith("compiles "))
  return run, tuple(int(n) for n in line.split()[1:])


@pytest.fixture
def settings():
  """jax's cache settings restored after the test (nothing compiles meanwhile, so none takes effect)."""
  saved = {name: getattr(jax.config, name) for name in SETTINGS}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def test_the_folder_its_default_and_off(settings, tmp_path, monkeypatch):
  monkeypatch.delenv(cli.CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cli.use_compilation_cache(None) == tmp_path / "xdg" / "af3-jax" / "compilation"
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "af3-jax" / "compilation")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cli.default_cache_folder() == tmp_path / "home" / ".cache" / "af3-jax" / "compilation"
  monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "env"))
  assert cli.use_compilation_cache(None) == tmp_path / "env" and (tmp_path / "env").is_dir()
  assert cli.use_compilation_cache(str(tmp_path / "flag")) == tmp_path / "flag"  # the flag before the variable
  assert jax.config.jax_enable_compilation_cache
  monkeypatch.setenv(cli.CACHE_ENV, "off")
  assert cli.use_compilation_cache(None) is None and not jax.config.jax_enable_compilation_cache
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError, match=f"{tmp_path / 'file' / 'x'}: cannot make the compilation cache folder"):
    cli.use_compilation_cache(str(tmp_path / "file" / "x"))
  monkeypatch.delenv(cli.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # the default cannot be made: no cache, no error
  assert cli.use_compilation_cache(None) is None


def test_a_second_process_compiles_nothing(tmp_path):
  """jax's defaults keep only programs that took a second to compile; ours keep every one."""
  folder, program = tmp_path / "cache", tmp_path / "program.py"
  program.write_text(PROGRAM)
  first, (compiles, misses, hits) = counted([str(program), str(folder)])
  assert first.returncode == 0 and compiles >= 2 and misses == compiles and hits == 0, first.stderr
  second, counts = counted([str(program), str(folder)])
  assert second.returncode == 0 and counts == (compiles, 0, compiles) and second.stdout == first.stdout
  off, counts = counted([str(program), "off"])
  assert off.returncode == 0 and counts == (compiles, 0, 0)


@pytest.mark.slow
def test_a_second_start_of_infer_compiles_nothing(model_dir, tmp_path):
  """infer.py twice on the tiny checkpoint with one cache folder: the second start compiles nothing and
  answers the same."""
  import numpy as np
  import soundfile as sf

  clip = tmp_path / "a.wav"
  sf.write(clip, 0.2 * np.random.default_rng(0).standard_normal(48000), 16000)
  args = ["infer.py", "--model", str(model_dir), "--audio", str(clip), "--greedy", "--max-new-tokens", "4"]
  first, (compiles, misses, _) = counted(args, env={cli.CACHE_ENV: str(tmp_path / "cache")})
  assert first.returncode == 0 and compiles > 0 and misses == compiles, first.stderr
  second, counts = counted(args, env={cli.CACHE_ENV: str(tmp_path / "cache")})
  assert second.returncode == 0 and counts == (compiles, 0, compiles) and second.stdout == first.stdout
