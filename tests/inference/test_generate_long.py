"""Long prompts: a 16,000-token prompt plus 1,024 new tokens through `af3_jax.generate`, against
transformers (the first 8 greedy tokens must be equal), the host memory of 5 and 10 minutes of audio
(AF3) and of 10 and 20 minutes (Music Flamingo, whose limit is 20), and 10 minutes' 20 windows encoded as
one batch.

Both run the blockwise attention path (`layers.attention`): XLA's one-piece attention would hold the
whole (T, S) score matrix, about 1 GiB in float32 per head at 16,000 tokens.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, random_text
from helpers.reference import build_torch_model
from helpers.tiny import TINY as SHAPES, Tiny
from flax import nnx

import af3_jax
from af3_jax import sharding
from af3_jax.checkpoints.pretrained import abstract_model
from af3_jax.inference import requests, slots

BENCH = ROOT / "bench" / "bench_memory.py"

PROMPT = 16_000
NEW = 1_024
TINY = Tiny("long", enc_width=32, enc_heads=1, dec_width=32, dec_heads=1, kv_heads=1, head_dim=32,
            rope_theta=1e6, vocab=2048)


@pytest.mark.slow
def test_long_prompt_generates_as_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  reference = build_torch_model(TINY)
  reference.save_pretrained(tmp_path)
  ids = random_text(np.random.default_rng(0), TINY, PROMPT)[None].astype(np.int64)
  with torch.no_grad():
    ref = reference.generate(torch.tensor(ids), do_sample=False, max_new_tokens=8, pad_token_id=0)
  ref = ref[:, PROMPT:].numpy()
  assert len(np.unique(ref)) > 2, f"degenerate reference path {ref}"

  model = af3_jax.from_pretrained(tmp_path, dtype=jnp.float32)
  ours = af3_jax.generate(model, dict(input_ids=ids), NEW)  # no eos in the config: all NEW tokens
  assert ours.shape == (1, NEW) and ((0 <= ours) & (ours < TINY.vocab)).all()
  np.testing.assert_array_equal(ours[:, :8], ref)


@pytest.mark.slow
@pytest.mark.parametrize("model_type, lengths", [("audioflamingo3", (5, 10)), ("musicflamingo", (10, 20))])
def test_long_audio_memory_is_linear_in_the_prompt(model_type, lengths):
  """The tests' tiny model (float32) generating after audio of two lengths (AF3: nvidia-style prompts of
  7,526 and 15,036 tokens; Music Flamingo: 15,018 and 30,018, padded to 16,384 and 32,768), each in a
  fresh process. With one-piece attention AF3's prefill temporaries were 3.1 and 12.3 GiB (peak RSS 3.6
  GiB at 5 minutes); now doubling the audio at most about doubles them and what generating adds to the
  resident set (seen for AF3: 0.20 -> 0.41 GiB and 0.39 -> 0.66 GiB, peak 1.06 GiB at 10 minutes; for
  Music Flamingo: 0.25 -> 0.50 GiB and 0.47 -> 0.81 GiB, peak 1.23 GiB at 20 minutes). bench/RESULTS.md
  has the tables."""
  runs = {}
  for minutes in lengths:
    child = subprocess.run([sys.executable, BENCH, "--child", f"--minutes={minutes}", f"--model-type={model_type}"],
                           capture_output=True, text=True, check=True, cwd=BENCH.parent)
    runs[minutes] = json.loads(child.stdout.strip().splitlines()[-1])
  short, long = (runs[m] for m in lengths)
  assert long["prefill_temp"] <= 2.2 * short["prefill_temp"]
  assert long["rss_peak"] - long["rss_before"] <= 2.2 * (short["rss_peak"] - short["rss_before"])
  assert long["rss_peak"] < 2 * 2**30


def test_the_encoder_takes_every_window_in_one_batch():
  """10 minutes of audio is 20 windows of 30 s, and the prefill encodes them as one batch: the encoder's
  two convolutions appear once each, over all 20 windows, not once per window."""
  cfg = SHAPES[0].config()  # the gqa shape (helpers.tiny)
  windows, e = 20, cfg.encoder
  tokens = windows * 750 + 16
  batch = {"input_ids": np.full((1, tokens), 299, np.int32), "attention_mask": np.ones((1, tokens), np.int32),
           "input_features": np.zeros((windows, e.num_mel_bins, e.mel_frames), np.float32),
           "input_features_mask": np.ones((windows, e.mel_frames), np.int32)}
  batch["input_ids"][0, :16] = 1
  graphdef, state, _ = abstract_model(cfg, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                                      mesh=sharding.single_device_mesh())
  shape = requests.Shape(1, tokens, windows)
  _, *rest = requests.dummy_batch(cfg, shape)
  jaxpr = jax.make_jaxpr(lambda state: slots.prefill(nnx.merge(graphdef, state), batch, *rest))(state)
  convs = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"]
  assert [eqn.invars[0].aval.shape[0] for eqn in convs] == [windows, windows]
