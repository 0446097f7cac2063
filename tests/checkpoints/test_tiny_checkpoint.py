"""`python -m convert.tiny` and `af3_jax.checkpoints.tiny`: a complete random checkpoint written without
torch, that transformers reads as the release (model, processor, generation settings, think adapter),
with our logits; and the benchmarks' presets agree with its tokenizer."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT
from helpers.parity import assert_close

import af3_jax
from af3_jax.checkpoints import tiny
from af3_jax.checkpoints.pretrained import read_generation_config

# convert.tiny as a user without torch runs it: transformers sees no torch at all.
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['convert.tiny', *sys.argv[1:]]; "
                 "runpy.run_module('convert.tiny', run_name='__main__')")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp("tiny") / "af3-tiny"
  run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(out), "--think"], cwd=ROOT, capture_output=True,
                       text=True)
  assert (run.returncode, run.stderr) == (0, ""), run.stderr[-2000:]
  assert run.stdout == f"wrote {out}: a tiny AF3 with random weights and a think adapter\n"
  return out


def test_the_folder_holds_what_the_release_holds(written):
  assert sorted(p.name for p in written.iterdir()) == [
      "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "processor_config.json",
      "think", "tokenizer.json", "tokenizer_config.json"]
  assert sorted(p.name for p in (written / "think").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  gen = read_generation_config(written)
  assert gen.eos_token_id == (295, 293) and (gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (True, 0.7, 20, 0.8)
  assert af3_jax.from_pretrained(written, dtype=jnp.float32).config == tiny.CONFIGS["audioflamingo3"]


def test_transformers_reads_it_with_our_logits_and_tokens(written):
  torch = pytest.importorskip("torch")
  import transformers

  model, info = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(written, output_loading_info=True)
  assert not any(info.values()), info  # every tensor there, none left to a default init
  processor = transformers.AutoProcessor.from_pretrained(written)
  assert isinstance(processor, transformers.AudioFlamingo3Processor)
  rng = np.random.default_rng(0)
  conversation = [{"role": "user", "content": [{"type": "audio", "audio": 0.1 * rng.standard_normal(40_000)},
                                               {"type": "text", "text": "What is in this audio?"}]}]
  theirs = processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, return_dict=True)
  ours = af3_jax.Processor.from_pretrained(written).apply_chat_template(conversation)
  np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"].numpy())
  with torch.no_grad():
    expected = model.eval()(**theirs).logits.numpy()
  assert_close(af3_jax.from_pretrained(written, dtype=jnp.float32)(**ours), expected)


def test_peft_reads_the_think_adapter_with_our_merged_logits(written):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers

  base = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(written)
  merged = peft.PeftModel.from_pretrained(base, written / "think").merge_and_unload().eval()
  ids = np.random.default_rng(1).integers(0, 290, (1, 16))
  with torch.no_grad():
    expected = merged(input_ids=torch.tensor(ids)).logits.numpy()
  plain = af3_jax.from_pretrained(written, dtype=jnp.float32)
  think = af3_jax.from_pretrained(written, dtype=jnp.float32, adapter=written / "think")
  assert_close(think(input_ids=ids), expected)
  assert not np.allclose(plain(input_ids=ids), expected, atol=1e-3)  # the adapter changes the model


@pytest.mark.parametrize("args, message", [
    (["{out}"], "error: {out}: already exists; choose a new folder"),
    ([], "error: give OUT (see --help)"),
    (["{out}2", "--model-type", "qwen"], "error: flag --model-type=qwen: value should be one of <audioflamingo3|musicflamingo>"),
    (["{out}/config.json/x"], "error: {out}/config.json/x: {out}/config.json is a file, not a folder"),
])
def test_bad_input_is_one_line(written, args, message):
  run = subprocess.run([sys.executable, "-m", "convert.tiny", *[a.format(out=written) for a in args]], cwd=ROOT,
                       capture_output=True, text=True)
  assert (run.returncode, run.stdout, run.stderr) == (1, "", message.format(out=written) + "\n")


def test_a_config_whose_audio_id_is_not_the_last_is_refused(tmp_path):
  cfg = tiny.CONFIGS["audioflamingo3"]
  with pytest.raises(ValueError, match="audio_token_id 7: the tokenizer puts <sound> at the last id, 299"):
    tiny.write(tmp_path / "x", config=type(cfg)(cfg.encoder, cfg.decoder, audio_token_id=7))
  assert not list(tmp_path.iterdir())


def test_the_benchmark_presets_use_the_tokenizers_audio_id():
  sys.path.insert(0, str(ROOT / "bench"))
  from presets import MODELS, with_tokenizer

  for name in ("test", "tiny"):
    cfg, tok = with_tokenizer(MODELS[name])
    assert cfg == MODELS[name] and len(tok) == cfg.decoder.vocab_size
    assert tok.convert_tokens_to_ids("<sound>") == cfg.audio_token_id == cfg.decoder.vocab_size - 1
