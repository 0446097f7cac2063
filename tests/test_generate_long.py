"""A 16,000-token prompt plus 1,024 new tokens through `af3_jax.generate`, against transformers.

One attention head and one kv head: XLA's CPU attention holds the whole (T, S) score matrix, about
1 GiB in float32 per head at this length. The first 8 greedy tokens must equal transformers'.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Tiny, build_torch_model, random_text

import af3_jax

torch = pytest.importorskip("torch")

PROMPT = 16_000
NEW = 1_024
TINY = Tiny("long", enc_width=32, enc_heads=1, dec_width=32, dec_heads=1, kv_heads=1, head_dim=32,
            rope_theta=1e6, vocab=2048)


@pytest.mark.slow
def test_long_prompt_generates_as_transformers(tmp_path):
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
