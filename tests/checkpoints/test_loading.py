"""Loading: every upstream layout gives the same parameters; bad checkpoints fail naming the problem."""

import json
import re
import shutil
import struct
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
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32).module()
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


def folder_with(src, dst, files):
  """A copy of the checkpoint `src` with `files` ({name: bytes or text}) written over it."""
  shutil.copytree(src, dst)
  for name, content in files.items():
    (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  return dst


def safetensors_bytes(header: bytes, header_length: int | None = None, data: bytes = b"") -> bytes:
  """A safetensors file: the header's length (or the one given), the header, the data."""
  return struct.pack("<Q", len(header) if header_length is None else header_length) + header + data


@pytest.mark.parametrize("content, problem", [
    (np.random.default_rng(0).bytes(4096), r"header length \d+ is impossible \(at most 4088 bytes here\)"),
    (safetensors_bytes(b"{}", header_length=2**40), r"header length 1099511627776 is impossible"),
    (safetensors_bytes(b"[]"), "the header is not a JSON object"),
    (safetensors_bytes(b'{"x": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}', data=bytes(16)),
     r"'x': bad shape \[-1, -4\]"),
], ids=["random_bytes", "huge_header_length", "header_not_object", "negative_shape"])
def test_corrupt_safetensors_are_one_line_errors(gqa_ckpt, tmp_path, content, problem):
  bad = folder_with(gqa_ckpt.hf, tmp_path / "bad", {"model.safetensors": content})
  with pytest.raises(ValueError, match=f"model.safetensors: not a readable safetensors file \\({problem}") as info:
    af3_jax.from_pretrained(bad, dtype=jnp.float32)
  assert "\n" not in str(info.value)


def edit_config(edit):
  """config.json content: the checkpoint's own, changed by `edit`."""
  return lambda config: json.dumps(edit(config))


INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize("name, content, problem", [
    ("config.json", "[]", "expected a JSON object, got list"),
    ("config.json", edit_config(lambda c: {**c, "text_config": [1]}), "text_config must be a JSON object, got list"),
    ("config.json", edit_config(lambda c: {**c, "text_config": {**c["text_config"], "hidden_size": "big"}}),
     "hidden_size must be a positive int, got 'big'"),
    ("config.json", edit_config(lambda c: {**c, "audio_config": {**c["audio_config"], "num_attention_heads": 0}}),
     "num_attention_heads must be a positive int, got 0"),
    (INDEX, "[]", "expected a JSON object, got list"),
    (INDEX, '{"weight_map": ["model.safetensors"]}', "weight_map must map tensor names to file names"),
    (INDEX, '{"weight_map": {"lm_head.weight": 3}}', "weight_map must map tensor names to file names"),
], ids=["config_list", "section_list", "size_string", "zero_heads", "index_list", "weight_map_list",
        "weight_map_number"])
def test_malformed_json_is_one_line_error_naming_the_file(gqa_ckpt, tmp_path, name, content, problem):
  if callable(content):
    content = content(json.loads((gqa_ckpt.hf / "config.json").read_text()))
  bad = folder_with(gqa_ckpt.hf, tmp_path / "bad", {name: content})
  with pytest.raises(ValueError, match=f"^{re.escape(str(bad / name))}: {problem}$"):
    af3_jax.from_pretrained(bad, dtype=jnp.float32)


def test_stray_params_folder_does_not_hijack_transformers_files(gqa_ckpt, tmp_path):
  stray = folder_with(gqa_ckpt.hf, tmp_path / "stray", {})
  (stray / "params").mkdir()
  (stray / "params" / "notes.txt").write_text("not a checkpoint")
  assert_same_params(af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32),
                     af3_jax.from_pretrained(stray, dtype=jnp.float32))


# A restore that failed part-way left tensorstore reads running, to fail later against a closed loop.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_orbax_folders_that_cannot_load_say_why(gqa_ckpt, tmp_path):
  """Orbax weights beside safetensors are ambiguous; a tree config.json does not describe is named, with
  the parameters that differ, before anything is read."""
  orbax = tmp_path / "orbax"
  from_hf.convert(str(gqa_ckpt.hf), orbax, jnp.float32)
  shutil.copy(gqa_ckpt.hf / "model.safetensors", orbax)
  both = f"^{re.escape(str(orbax))}: holds both safetensors and an orbax checkpoint in params/"
  with pytest.raises(ValueError, match=both):
    af3_jax.from_pretrained(orbax, dtype=jnp.float32)
  (orbax / "model.safetensors").unlink()
  config = json.loads((orbax / "config.json").read_text())
  config["text_config"]["intermediate_size"] += 1
  (orbax / "config.json").write_text(json.dumps(config))
  restore = (f"^{re.escape(str(orbax / 'params'))}: cannot restore this orbax checkpoint .*"
             r"language_model/layers/mlp/down_proj/kernel: saved \(2, 128, 64\), config.json says \(2, 129, 64\)")
  with pytest.raises(ValueError, match=restore) as info:
    af3_jax.from_pretrained(orbax, dtype=jnp.float32)
  assert "\n" not in str(info.value)
