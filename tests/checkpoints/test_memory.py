"""Streaming load keeps host memory near the model's size (the brief's bound: 1.3x in the target dtype)."""

import subprocess
import sys
import textwrap

import pytest
from helpers.tiny import Tiny

torch = pytest.importorskip("torch")

# Runs in a fresh process and samples anonymous memory (RssAnon) from a thread every ~0.1 ms. The
# page cache of the memory-mapped safetensors files is left out: the kernel reclaims it under pressure.
_MEASURE = textwrap.dedent("""
    import math, sys, threading
    import jax, jax.numpy as jnp
    import af3_jax
    from af3_jax import sharding
    from af3_jax.checkpoints import locate
    from af3_jax.checkpoints.pretrained import abstract_model

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024

    root = locate.resolve(sys.argv[1])
    mesh = sharding.single_device_mesh()
    _, abstract, _ = abstract_model(locate.read_config(root), param_dtype=jnp.bfloat16,
                                    compute_dtype=jnp.bfloat16, mesh=mesh)
    size = sum(math.prod(x.shape) * 2 for x in jax.tree.leaves(abstract))
    base, peak, done = anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())

    sys.setswitchinterval(1e-4)
    sampler = threading.Thread(target=sample)
    sampler.start()
    model = af3_jax.from_pretrained(root, dtype=jnp.bfloat16)
    jax.block_until_ready(model.state)
    done.set()
    sampler.join()
    print(size, peak[0] - base)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_load_peak_host_memory(tmp_path):
  import transformers

  # ~120M parameters (240 MB in bf16), stored in float32 as transformers saves by default.
  tiny = Tiny("mem", enc_width=256, enc_heads=4, dec_width=512, dec_heads=8, kv_heads=2, head_dim=64,
              rope_theta=1e6, vocab=32000, layers=8)
  transformers.AudioFlamingo3ForConditionalGeneration(tiny.hf_config()).save_pretrained(tmp_path)
  run = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], capture_output=True, text=True, check=True)
  size, peak = map(int, run.stdout.split())
  assert peak <= 1.3 * size, f"peak {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
