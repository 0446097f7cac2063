"""Loading: every upstream layout gives the same parameters; bad checkpoints fail naming the problem."""

import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import af3_jax
from convert import from_hf


def params(model):
  return jax.tree.map(np.asarray, model.state)


def assert_same_params(a, b):
  leaves_a, tree_a = jax.tree.flatten(params(a))
  leaves_b, tree_b = jax.tree.flatten(params(b))
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y)


def test_all_layouts_load_identically(ckpt):
  """transformers' save_pretrained names (sharded, index json), module-tree names, NVIDIA folders."""
  ref = af3_jax.from_pretrained(ckpt.hf, dtype=jnp.float32)
  assert_same_params(ref, af3_jax.from_pretrained(ckpt.tree, dtype=jnp.float32))
  assert_same_params(ref, af3_jax.from_pretrained(ckpt.nvidia, dtype=jnp.float32))
  assert ref.config == af3_jax.from_pretrained(ckpt.nvidia, dtype=jnp.float32).config


def test_loaded_values_are_the_torch_tensors(gqa_ckpt):
  """Spot-check the transforms against the torch state dict itself (linear, conv, norm, embedding)."""
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32).module
  sd = {k: v.numpy() for k, v in gqa_ckpt.torch_model.state_dict().items()}
  np.testing.assert_array_equal(model.lm_head.kernel[...], sd["lm_head.weight"].T)
  np.testing.assert_array_equal(model.audio_tower.conv2.kernel[...],
                                sd["model.audio_tower.conv2.weight"].transpose(2, 1, 0))
  np.testing.assert_array_equal(model.language_model.layers.self_attn.k_proj.bias[...][1],
                                sd["model.language_model.layers.1.self_attn.k_proj.bias"])
  np.testing.assert_array_equal(model.language_model.norm.scale[...], sd["model.language_model.norm.weight"])
  np.testing.assert_array_equal(model.audio_tower.embed_positions.embedding[...],
                                sd["model.audio_tower.embed_positions.weight"])


def test_orbax_round_trip(gqa_ckpt, tmp_path):
  dst = tmp_path / "orbax"
  from_hf.convert(str(gqa_ckpt.hf), dst, jnp.float32)
  assert (dst / "config.json").is_file() and (dst / "generation_config.json").is_file()
  assert_same_params(af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32),
                     af3_jax.from_pretrained(dst, dtype=jnp.float32))
  with pytest.raises(ValueError, match="already exists"):
    from_hf.convert(str(gqa_ckpt.hf), dst, jnp.float32)


def test_bfloat16_load_rounds_the_float32_checkpoint(gqa_ckpt):
  f32 = params(af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32))
  bf16 = params(af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.bfloat16))
  for x, y in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16), strict=True):
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(x.astype(jnp.bfloat16), y)


def edited_copy(src, dst, edit):
  shutil.copytree(src, dst)
  tensors = load_file(dst / "model.safetensors")
  edit(tensors)
  save_file(tensors, dst / "model.safetensors")
  return dst


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"),
     "missing keys: language_model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"audio_tower.layers.0.extra.weight": np.zeros(3, np.float32)}),
     "unexpected keys: audio_tower.layers.0.extra.weight"),
    (lambda t: t.update({"vision_tower.weight": np.zeros(3, np.float32)}), "unexpected checkpoint keys: .*vision_tower"),
    (lambda t: t.update({"lm_head.weight": np.zeros((3, 4), np.float32)}),
     r"shape mismatches: lm_head.weight: checkpoint \(3, 4\)"),
])
def test_bad_checkpoints_name_the_problem(gqa_ckpt, tmp_path, edit, message):
  bad = edited_copy(gqa_ckpt.hf, tmp_path / "bad", edit)
  with pytest.raises(ValueError, match=message):
    af3_jax.from_pretrained(bad, dtype=jnp.float32)


def test_pickle_checkpoints_are_refused(gqa_ckpt, tmp_path):
  bad = tmp_path / "pickled"
  bad.mkdir()
  shutil.copy(gqa_ckpt.hf / "config.json", bad)
  (bad / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match="no .safetensors files"):
    af3_jax.from_pretrained(bad)
  (bad / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
    af3_jax.from_pretrained(bad)


def test_missing_paths_and_uncached_hub_ids(tmp_path):
  with pytest.raises(ValueError, match="no such checkpoint directory"):
    af3_jax.from_pretrained(tmp_path / "nothing" / "here")
  with pytest.raises(ValueError, match="not an AF3 checkpoint"):
    af3_jax.from_pretrained(tmp_path)
  with pytest.raises(ValueError, match="hf download nobody-af3/missing"):
    af3_jax.from_pretrained("nobody-af3/missing")  # HF_HUB_OFFLINE is set for tests


def test_convert_cli_bad_input_is_one_line(tmp_path):
  run = subprocess.run([sys.executable, "-m", "convert.from_hf", str(tmp_path / "absent"), str(tmp_path / "out")],
                       capture_output=True, text=True)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent'}: no such checkpoint directory"]
  assert not (tmp_path / "out").exists()
