"""convert.to_hf on a run's model folder: tensors keep the dtype the model was saved in, or take --dtype."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from programs import to_hf

import af3_jax
from af3_jax.checkpoints import orbax
from af3_jax.training import workdirs



@pytest.fixture(scope="module")
def float32_run(gqa_ckpt, tokenizer_dir, tmp_path_factory):
  """A workdir whose model/ is what training writes (`orbax.save_model`, and the step it holds), in float32."""
  workdir = tmp_path_factory.mktemp("run")
  model = af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)
  orbax.save_model(workdir / "model", model.config, model.state, tokenizer_dir)
  (workdir / "model" / workdirs.TRAINER_STATE).write_text(json.dumps({"step": 1}))
  return workdir


def stored_dtypes(path) -> set[str]:
  """The dtypes a safetensors file's header names, read straight from the file."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


def test_export_keeps_the_float32_of_the_run(float32_run, tmp_path):
  out = to_hf(float32_run, tmp_path / "hf")
  assert stored_dtypes(out / "model.safetensors") == {"F32"}
  assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
  exported = af3_jax.from_pretrained(out, dtype=jnp.float32)
  saved = af3_jax.from_pretrained(float32_run / "model", dtype=jnp.float32)
  for x, y in zip(jax.tree.leaves(saved.state), jax.tree.leaves(exported.state), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dtype_flag_chooses(float32_run, tmp_path):
  out = to_hf(float32_run, tmp_path / "hf", "--dtype=bfloat16")
  assert stored_dtypes(out / "model.safetensors") == {"BF16"}
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
