"""Think-mode adapters: a peft LoRA (and extra full tensors) merged into our weights equals peft's merge."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import audio_tokens, random_features, random_text
from helpers.reference import build_torch_model

import af3_jax

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def adapted(gqa_ckpt, tmp_path_factory):
  """(adapter folder, peft's merged torch model) for a LoRA with random A and B on every decoder linear."""
  base = build_torch_model(gqa_ckpt.tiny)  # the same seed as gqa_ckpt, so the same base weights
  config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, bias="none")
  model = peft.get_peft_model(base, config)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
  folder = tmp_path_factory.mktemp("adapter")
  model.save_pretrained(folder)
  extra = {"model.multi_modal_projector.linear_1.bias": torch.randn(gqa_ckpt.tiny.dec_width, generator=g)}
  torch.save(extra, folder / "non_lora_trainables.bin")
  merged = model.merge_and_unload().eval()
  with torch.no_grad():
    merged.model.multi_modal_projector.linear_1.bias.copy_(extra["model.multi_modal_projector.linear_1.bias"])
  return folder, merged


def test_merged_adapter_matches_peft(gqa_ckpt, adapted):
  folder, merged = adapted
  assert (folder / "adapter_model.safetensors").is_file()
  rng = np.random.default_rng(0)
  tiny = gqa_ckpt.tiny
  feats, fmask = random_features(rng, [1800])
  ids = np.concatenate([random_text(rng, tiny, 4), np.full(audio_tokens(1800), tiny.audio_token_id),
                        random_text(rng, tiny, 6)])[None]
  ours = np.asarray(af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32, adapter=folder)(
      input_ids=ids, input_features=feats, input_features_mask=fmask))
  with torch.no_grad():
    ref = merged(input_ids=torch.tensor(ids), input_features=torch.tensor(feats),
                 input_features_mask=torch.tensor(fmask)).logits.numpy()
  base = np.asarray(af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)(
      input_ids=ids, input_features=feats, input_features_mask=fmask))
  assert np.abs(base - ref).max() > 1e-2 * np.abs(ref).max()  # the adapter changes the logits
  assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_bad_adapter_folders(gqa_ckpt, tmp_path):
  with pytest.raises(ValueError, match="no adapter_config.json"):
    af3_jax.from_pretrained(gqa_ckpt.hf, adapter=tmp_path)
  (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
  (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
  with pytest.raises(ValueError, match="adapter_model.safetensors: missing"):
    af3_jax.from_pretrained(gqa_ckpt.hf, adapter=tmp_path)
