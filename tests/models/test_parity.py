"""Parity with transformers' AudioFlamingo3ForConditionalGeneration on tiny random checkpoints.

Float32, highest matmul precision: max |ours - torch| <= 1e-4 * max |torch| for every comparison.
Inputs are drawn fresh from a seeded generator; the reference is always the PyTorch model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import audio_tokens, left_pad, random_features, random_prompts, random_text
from helpers.parity import assert_close
from helpers.reference import torch_logits

import af3_jax

torch = pytest.importorskip("torch")


def test_conv_front_end(ckpt, loaded):
  feats, _ = random_features(np.random.default_rng(1), [3000, 1200])
  tower = ckpt.torch_model.model.audio_tower
  with torch.no_grad():
    x = torch.tensor(feats)
    x = torch.nn.functional.gelu(tower.conv2(torch.nn.functional.gelu(tower.conv1(x))))
    ref = (x.permute(0, 2, 1) + tower.embed_positions.weight).numpy()
  assert_close(loaded.module().audio_tower.embed(jnp.asarray(feats)), ref)


def test_encoder(ckpt, loaded):
  feats, mask = random_features(np.random.default_rng(2), [3000, 731, 2])
  with torch.no_grad():
    ref = ckpt.torch_model.model.audio_tower(torch.tensor(feats), input_features_mask=torch.tensor(mask))
  assert_close(loaded.module().audio_tower(jnp.asarray(feats), jnp.asarray(mask)), ref.last_hidden_state.numpy())


def test_projector(ckpt, loaded):
  x = np.random.default_rng(3).standard_normal((2, 750, ckpt.tiny.enc_width)).astype(np.float32)
  with torch.no_grad():
    ref = ckpt.torch_model.model.multi_modal_projector(torch.tensor(x)).numpy()
  assert_close(loaded.module().multi_modal_projector(jnp.asarray(x)), ref)


def test_decoder_layer(ckpt, loaded):
  rng = np.random.default_rng(4)
  b, t = 2, 11
  x = rng.standard_normal((b, t, ckpt.tiny.dec_width)).astype(np.float32)
  lm = ckpt.torch_model.model.language_model
  with torch.no_grad():
    pos = torch.arange(t)[None].expand(b, t)
    rope = lm.rotary_emb(torch.tensor(x), pos)
    ref = lm.layers[1](torch.tensor(x), position_embeddings=rope, position_ids=pos)
  ref = ref[0] if isinstance(ref, tuple) else ref
  graphdef, stacked = nnx.split(loaded.module().language_model.layers)
  layer = nnx.merge(graphdef, jax.tree.map(lambda p: p[1], stacked))
  ours, _ = layer(jnp.asarray(x), jnp.asarray(pos.numpy()), jnp.ones((b, t), bool))
  assert_close(ours, ref.numpy())


def test_logits_single_audio(ckpt, loaded):
  rng = np.random.default_rng(5)
  feats, fmask = random_features(rng, [730])  # 7.3 s
  tiny = ckpt.tiny
  ids = np.concatenate([random_text(rng, tiny, 6), np.full(audio_tokens(730), tiny.audio_token_id),
                        random_text(rng, tiny, 5)])[None]
  mask = np.ones_like(ids)
  ours = loaded(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask)
  assert_close(ours, torch_logits(ckpt.torch_model, ids, mask, feats, fmask))


def test_logits_batch_left_padded(ckpt, loaded):
  """Two audios of different lengths in one batch; the shorter prompt is left padded."""
  rng = np.random.default_rng(6)
  tiny = ckpt.tiny
  frames = [3000, 1234]
  feats, fmask = random_features(rng, frames)
  rows = [np.concatenate([random_text(rng, tiny, 4), np.full(audio_tokens(n), tiny.audio_token_id),
                          random_text(rng, tiny, 3 + i)]) for i, n in enumerate(frames)]
  batch = left_pad(rows)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  ours = np.asarray(loaded(**batch, input_features=feats, input_features_mask=fmask))
  ref = torch_logits(ckpt.torch_model, ids, mask, feats, fmask)
  valid = mask.astype(bool)  # padded positions are garbage in both
  assert_close(ours[valid], ref[valid])


def test_logits_padding_holding_the_audio_id(tester_ckpt):
  """transformers' tester config, where `<sound>` is id 0: three left-padded rows (a full window, a
  short one, a full one) whose padding holds 0 in our copy and the pad id 1 in transformers' (which
  would take 0 for audio) give transformers' logits at every real position."""
  tester = tester_ckpt.tiny
  rows, feats, fmask = random_prompts(np.random.default_rng(11), tester, [60, 41, 60])
  batch = left_pad(rows, tester.audio_token_id, extra=5)
  mask = batch["attention_mask"]
  ref_ids = np.where(mask == 1, batch["input_ids"], tester.pad_token_id)
  ref = torch_logits(tester_ckpt.torch_model, ref_ids, mask, feats, fmask)
  model = af3_jax.from_pretrained(tester_ckpt.hf, dtype=jnp.float32)
  ours = np.asarray(model(**batch, input_features=feats, input_features_mask=fmask))
  valid = mask.astype(bool)  # padded positions are garbage in both
  assert_close(ours[valid], ref[valid])


def test_logits_two_windows_short_tail(ckpt, loaded):
  """45 s of audio: a full window and a 15 s tail."""
  rng = np.random.default_rng(7)
  tiny = ckpt.tiny
  feats, fmask = random_features(rng, [3000, 1500])
  n = audio_tokens(3000) + audio_tokens(1500)
  assert n == 750 + 375
  ids = np.concatenate([random_text(rng, tiny, 3), np.full(n, tiny.audio_token_id), random_text(rng, tiny, 4)])[None]
  mask = np.ones_like(ids)
  ours = loaded(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask)
  assert_close(ours, torch_logits(ckpt.torch_model, ids, mask, feats, fmask))


def test_logits_text_only(ckpt, loaded):
  rng = np.random.default_rng(8)
  ids = np.stack([random_text(rng, ckpt.tiny, 9), random_text(rng, ckpt.tiny, 9)])
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  ours = np.asarray(loaded(input_ids=ids, attention_mask=mask))
  ref = torch_logits(ckpt.torch_model, ids, mask)
  assert_close(ours[mask.astype(bool)], ref[mask.astype(bool)])


def test_logits_bfloat16(gqa_ckpt):
  """bf16 weights and compute on both sides. Rounding differs op by op, so the bound is looser:
  max |diff| <= 3e-2 * max |logit| (float32 agrees to 1e-4)."""
  rng = np.random.default_rng(9)
  tiny = gqa_ckpt.tiny
  feats, fmask = random_features(rng, [2000])
  ids = np.concatenate([random_text(rng, tiny, 5), np.full(audio_tokens(2000), tiny.audio_token_id),
                        random_text(rng, tiny, 5)])[None]
  mask = np.ones_like(ids)
  ours = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.bfloat16)(
      input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask)
  assert ours.dtype == jnp.bfloat16
  ref_model = type(gqa_ckpt.torch_model).from_pretrained(gqa_ckpt.hf, dtype=torch.bfloat16).eval()
  pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos,
                    input_features=torch.tensor(feats, dtype=torch.bfloat16),
                    input_features_mask=torch.tensor(fmask)).logits.float().numpy()
  assert_close(ours, ref, rtol=3e-2)


def test_audio_token_count_mismatch_is_an_error(gqa_ckpt):
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  rng = np.random.default_rng(10)
  feats, fmask = random_features(rng, [3000])
  ids = np.full((1, 749), gqa_ckpt.tiny.audio_token_id)
  with pytest.raises(ValueError, match="749 <sound> tokens .* 750 frames"):
    model(input_ids=ids, input_features=feats, input_features_mask=fmask)
