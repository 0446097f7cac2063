"""Helpers the tests share (fixtures live in conftest.py): the tiny model shapes and their PyTorch
reference, random inputs, the float32 parity bound, attention's reference masks, sharding checks,
multi-process runs, compile counting and TensorBoard records read back. Running the programs
themselves is in programs.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from af3_jax import sharding
from af3_jax.checkpoints import tiny as tiny_checkpoint
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig, RoTEConfig

try:  # the PyTorch reference; tests that need it skip without it
  import torch
  import transformers
  from safetensors.torch import load_file, save_file
except ImportError:
  torch = None

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the programs and bench/ run from here
CHOICES = [["Man", "Woman", "Child", "Robot"], ["wind", "wharf"], ["A dog barking", "A cat", "Birds", "Rain", "Wind"],
           ["Lake", "A cooking competition", "A motorsport racing event", "A live concert", "A political rally",
            "Forest", "Desert", "Sea"]]
CLIPS = {"a.wav": 3.0, "b.flac": 2.0}  # seconds: 300 and 200 mel frames

# The tiny checkpoints' weights: a draw whose greedy answers do not collapse onto one repeated token, as a
# random model's often do (test_generate needs varied reference paths, test_infer a printable answer).
SEED = 4


@dataclasses.dataclass(frozen=True)
class Tiny:
  """One tiny model shape. Audio token id is the last vocab entry."""

  name: str
  enc_width: int
  enc_heads: int
  dec_width: int
  dec_heads: int
  kv_heads: int
  head_dim: int
  rope_theta: float
  vocab: int = 300
  layers: int = 2
  music: bool = False  # Music Flamingo: RoTE, and `<|sound_bos|>`, `<|sound_eos|>` just below `<sound>`

  @property
  def audio_token_id(self) -> int:
    return self.vocab - 1

  @property
  def audio_bos_token_id(self) -> int:
    return self.vocab - 3

  @property
  def audio_eos_token_id(self) -> int:
    return self.vocab - 2

  def config(self) -> AF3Config:
    cfg = AF3Config(
        encoder=EncoderConfig(hidden_size=self.enc_width, num_layers=self.layers, num_heads=self.enc_heads,
                              intermediate_size=2 * self.enc_width),
        decoder=DecoderConfig(vocab_size=self.vocab, hidden_size=self.dec_width, num_layers=self.layers,
                              num_heads=self.dec_heads, num_kv_heads=self.kv_heads, head_dim=self.head_dim,
                              intermediate_size=2 * self.dec_width, rope_theta=self.rope_theta),
        audio_token_id=self.audio_token_id)
    if not self.music:
      return cfg
    return dataclasses.replace(cfg, rote=RoTEConfig(), audio_bos_token_id=self.audio_bos_token_id,
                               audio_eos_token_id=self.audio_eos_token_id)

  def hf_config(self):
    config_cls = transformers.MusicFlamingoConfig if self.music else transformers.AudioFlamingo3Config
    return config_cls(**self.config().to_hf_dict())

  def write(self, dst: Path, seed: int = SEED) -> Path:
    """This shape as `convert.tiny` writes a checkpoint (tokenizer included), without its generation
    defaults: decoding is greedy and stops only at max_new_tokens, so tests control both."""
    return tiny_checkpoint.write(dst, config=self.config(), seed=seed, generation=None)


TINY = [
    # GQA (4 query heads share 2 kv heads), a non-default rope theta.
    Tiny("gqa", enc_width=32, enc_heads=2, dec_width=64, dec_heads=4, kv_heads=2, head_dim=16, rope_theta=5000.0),
    # Odd head counts everywhere, one kv head (MQA), head_dim != width / heads.
    Tiny("odd", enc_width=48, enc_heads=3, dec_width=48, dec_heads=3, kv_heads=1, head_dim=24, rope_theta=1e6),
]


# Music Flamingo: an encoder of 48 channels turns 2 x 2 x ceil(int(9.6) / 2) = 20 of them (an odd R).
MUSIC = Tiny("music", enc_width=48, enc_heads=3, dec_width=64, dec_heads=4, kv_heads=2, head_dim=16,
             rope_theta=5000.0, music=True)


@dataclasses.dataclass(frozen=True)
class Tester:
  """The config of transformers' own `AudioFlamingo3ModelTester` (tests/models/audioflamingo3/
  test_modeling_audioflamingo3.py): `<sound>` is id 0 and padding id 1, so padding written as 0 looks
  like audio; 80 mel bins and 30 source positions make 60-frame windows of 15 audio tokens."""

  name: str = "tester"
  vocab: int = 99
  audio_token_id: int = 0
  pad_token_id: int = 1
  num_mel_bins: int = 80
  window: int = 60  # mel frames per window: 2 * max_source_positions

  def hf_config(self):
    return transformers.AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", hidden_size=16, num_attention_heads=4,
                          intermediate_size=16, num_hidden_layers=2, num_mel_bins=self.num_mel_bins,
                          max_source_positions=self.window // 2),
        text_config=dict(model_type="qwen2", vocab_size=self.vocab, hidden_size=32, intermediate_size=36,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=52, pad_token_id=self.pad_token_id),
        audio_token_id=self.audio_token_id)

  def text(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """Random ids other than `<sound>` and padding, as the tester draws them."""
    return rng.integers(2, self.vocab, n)


def randomize(model, seed: int) -> None:
  """Redraws every tensor as `tiny_checkpoint.random_params` draws them: weights and biases ~ N(0, 0.1),
  norm weights ~ 1 + N(0, 0.1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      noise = torch.randn(p.shape, generator=g) * 0.1
      p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)


def build_torch_model(tiny: Tiny | Tester, seed: int = SEED):
  """transformers' model of `tiny` with random weights: for a `Tiny`, read from the checkpoint
  `Tiny.write` writes; transformers' tester config is built by transformers and redrawn."""
  if isinstance(tiny, Tester):
    torch.manual_seed(seed)
    model = transformers.AudioFlamingo3ForConditionalGeneration(tiny.hf_config())
    randomize(model, seed)
    return model.eval()
  with tempfile.TemporaryDirectory() as tmp:
    return torch_model_of(tiny.write(Path(tmp) / tiny.name, seed))


def torch_model_of(folder: Path):
  """transformers' AF3 or Music Flamingo (as config.json says) holding the tensors of a checkpoint
  `Tiny.write` wrote, every one of them (strict), built from its config.json rather than by
  `from_pretrained`, which would make `save_pretrained` write the names it read instead of transformers'
  own."""
  music = json.loads((folder / "config.json").read_text())["model_type"] == "musicflamingo"
  config = (transformers.MusicFlamingoConfig if music else transformers.AudioFlamingo3Config).from_pretrained(folder)
  model_cls = (transformers.MusicFlamingoForConditionalGeneration if music
               else transformers.AudioFlamingo3ForConditionalGeneration)
  model = model_cls(config)
  model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
  return model.eval()


def write_nvidia_layout(model, dst: Path) -> None:
  """The original release layout: llm/, sound_tower/ (Whisper field names), sound_mm_projector/."""
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  cfg = model.config
  folders = {"llm": {}, "sound_tower": {}, "sound_mm_projector": {}}
  for key, value in state.items():
    if key.startswith("model.language_model."):
      folders["llm"]["model." + key.removeprefix("model.language_model.")] = value
    elif key == "lm_head.weight":
      folders["llm"][key] = value
    elif key.startswith("model.audio_tower."):
      folders["sound_tower"][key.removeprefix("model.audio_tower.")] = value
    else:
      short = key.removeprefix("model.multi_modal_projector.")
      folders["sound_mm_projector"][short.replace("linear_1", "layers.0").replace("linear_2", "layers.2")] = value
  for folder, tensors in folders.items():
    (dst / folder).mkdir(parents=True)
    save_file(tensors, dst / folder / "model.safetensors")
  cfg.text_config.to_json_file(dst / "llm" / "config.json")
  (dst / "llm" / "added_tokens.json").write_text(json.dumps({"<sound>": cfg.audio_token_id}))
  a = cfg.audio_config
  (dst / "sound_tower" / "config.json").write_text(json.dumps(dict(
      model_type="qwen2_audio_encoder", num_mel_bins=a.num_mel_bins, d_model=a.hidden_size,
      encoder_layers=a.num_hidden_layers, encoder_attention_heads=a.num_attention_heads,
      encoder_ffn_dim=a.intermediate_size, max_source_positions=a.max_source_positions,
      activation_function="gelu")))
  (dst / "sound_mm_projector" / "config.json").write_text(json.dumps({"model_type": "sound_mm_projector"}))


@dataclasses.dataclass
class Checkpoint:
  tiny: Tiny | Tester
  torch_model: object
  hf: Path  # what `save_pretrained` writes (legacy names), sharded with an index json
  tree: Path  # module-tree names, one file: what `Tiny.write` (`convert.tiny`) writes
  nvidia: Path


def start_processes(args: list[str], cwd: Path, n: int = 2) -> list[subprocess.Popen]:
  """`python *args` as the `n` processes of one jax.distributed run on this machine, one CPU device
  each (the variables `distributed.initialize_distributed` reads), with stdout and stderr piped."""
  portpicker = pytest.importorskip("portpicker")
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": str(n),
         "JAX_COORDINATOR_ADDRESS": f"localhost:{portpicker.pick_unused_port()}"}
  return [subprocess.Popen([sys.executable, *args], cwd=cwd, env={**env, "JAX_PROCESS_ID": str(i)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
  """Each process's (stdout, stderr) once all have ended; any still running after `timeout` seconds
  is killed and raises, so a hang fails the test instead of blocking the suite."""
  deadline = time.time() + timeout
  try:
    return [p.communicate(timeout=max(deadline - time.time(), 1)) for p in procs]
  finally:
    for p in procs:
      p.kill()


def torch_logits(model, ids, mask, feats=None, feats_mask=None):
  """transformers' logits; positions from the mask, as `generate` derives them (a plain forward would
  count the pads)."""
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  if feats is not None:
    kw.update(input_features=torch.tensor(feats), input_features_mask=torch.tensor(feats_mask))
  with torch.no_grad():
    return model(**kw).logits.numpy()


RTOL = 1e-4  # float32 parity bound, relative to the reference's largest magnitude


def assert_close(ours, ref, rtol: float = RTOL, scale: float | None = None) -> None:
  """max |ours - ref| <= rtol * scale, the scale being max |ref| unless given; shapes must be equal."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  scale = np.abs(ref).max() if scale is None else scale
  err = np.abs(ours - ref).max()
  assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} * {scale:.3g}"


def audio_tokens(mel_frames: int) -> int:
  """Upstream's token count for a window with `mel_frames` valid frames (conv2, then the pool)."""
  conv = (mel_frames - 1) // 2 + 1
  return max((conv - 2) // 2 + 1, 0)


def random_features(rng: np.random.Generator, mel_frames: list[int], mel_bins: int = 128,
                    window: int = 3000) -> tuple[np.ndarray, np.ndarray]:
  """(windows, mel_bins, window) features and the (windows, window) mask for the given valid frame counts."""
  feats = rng.standard_normal((len(mel_frames), mel_bins, window)).astype(np.float32)
  mask = (np.arange(window)[None, :] < np.asarray(mel_frames)[:, None]).astype(np.int32)
  return feats, mask


def random_text(rng: np.random.Generator, tiny: Tiny, n: int) -> np.ndarray:
  return rng.integers(0, tiny.audio_token_id, n)


def left_pad(rows: list[np.ndarray], pad_id: int = 0, extra: int = 0) -> dict[str, np.ndarray]:
  """`input_ids` and `attention_mask` (batch, longest + extra): rows left padded with `pad_id`."""
  width = max(map(len, rows)) + extra
  return dict(input_ids=np.stack([np.pad(r, (width - len(r), 0), constant_values=pad_id) for r in rows]),
              attention_mask=np.stack([np.pad(np.ones_like(r), (width - len(r), 0)) for r in rows]))


def random_prompts(rng: np.random.Generator, tester: Tester, mel_frames: list[int]):
  """One unpadded prompt per window (4 + 3i text ids, the window's `<sound>` tokens, 5 text ids), and
  the windows' (windows, mel bins, window) features and (windows, window) mask."""
  feats, mask = random_features(rng, mel_frames, tester.num_mel_bins, tester.window)
  rows = [np.concatenate([tester.text(rng, 4 + 3 * i), np.full(audio_tokens(n), tester.audio_token_id),
                          tester.text(rng, 5)]) for i, n in enumerate(mel_frames)]
  return rows, feats, mask


def mesh_222():
  return sharding.make_mesh((2, 2, 2))


def assert_specs_divide(shardings_tree, abstract_tree):
  """Every spec has the array's rank and each sharded dim divides by its mesh axes' product."""
  sharded = 0
  for s, a in zip(jax.tree.leaves(shardings_tree), jax.tree.leaves(abstract_tree), strict=True):
    spec = tuple(s.spec)
    assert len(spec) == len(a.shape), f"spec {s.spec} for an array of shape {a.shape}"
    for dim, axes in zip(a.shape, spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      assert dim % math.prod(s.mesh.shape[x] for x in axes) == 0
    sharded += any(x is not None for x in spec)
  assert sharded > 0  # the rules did shard something


def segment_ids(b, t, lengths) -> np.ndarray:
  """(B, T) int: row i holds samples of `lengths[i]` tokens, numbered from 1, then padding (0)."""
  ids = np.zeros((b, t), np.int32)
  for i, row in enumerate(lengths):
    ids[i, :sum(row)] = np.repeat(np.arange(1, len(row) + 1), row)
  return ids


def reference_mask(b, t, s, *, causal, offset, pads=None, lengths=None, segments=None) -> np.ndarray:
  """(B, 1, T, S) bool built directly: left padding, written cache slots, causality, key lengths,
  packed samples (each sees only itself; padding sees nothing)."""
  key = np.ones((b, s), bool)
  if pads is not None:
    key &= np.arange(s)[None] >= np.array(pads)[:, None]
  if offset is not None:
    key &= np.arange(s)[None] < offset + t  # slots past the new tokens are not written yet
  if lengths is not None:
    key &= np.arange(s)[None] < np.array(lengths)[:, None]
  mask = np.broadcast_to(key[:, None, None, :], (b, 1, t, s))
  if causal:
    mask = mask & (np.arange(s)[None, :] <= (offset or 0) + np.arange(t)[:, None])
  if segments is not None:
    ids = segment_ids(b, t, segments)
    mask = mask & (ids[:, None, :, None] == ids[:, None, None, :]) & (ids[:, None, :, None] > 0)
  return mask


def case_inputs(case: dict, seed: int = 0):
  """q, k, v of `case` (float32, unit normal), `attention`'s keyword arguments for its masks, and the
  (B, 1, T, S) reference mask. `offset` is one slot for every row, or one per row."""
  b, t, s, n, k, h = case["shape"]
  rng = np.random.default_rng(seed)
  q, key, value = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                   for shape in [(b, t, n, h), (b, s, k, h), (b, s, k, h)])
  offset = case["offset"]
  row = lambda name, i: None if name not in case else (case[name][i],)
  mask = np.concatenate([
      reference_mask(1, t, s, causal=case["causal"], offset=None if offset is None else np.broadcast_to(offset, b)[i],
                     pads=row("pads", i), lengths=row("lengths", i), segments=row("segments", i))
      for i in range(b)])
  kw = dict(scale=h**-0.5, causal=case["causal"])
  if "lengths" in case:
    kw["kv_lengths"] = jnp.array(case["lengths"])
  elif "segments" in case:
    kw["segment_ids"] = jnp.asarray(segment_ids(b, t, case["segments"]))
    kw["key_mask"] = kw["segment_ids"] > 0
  else:
    kw["key_mask"] = jnp.asarray(mask[:, 0, -1])  # the last query sees every key a row has
  if offset is not None:
    kw["q_offset"] = jnp.asarray(offset, jnp.int32)
  return (q, key, value), kw, mask


MAX_NEW = 16


PAD = 0


def torch_generate(model, batch, **kw) -> np.ndarray:
  """New tokens from transformers' greedy generate; positions come from the attention mask."""
  with torch.no_grad():
    out = model.generate(**{k: torch.tensor(v) for k, v in batch.items()}, do_sample=False,
                         max_new_tokens=MAX_NEW, pad_token_id=PAD, **kw)
  return out[:, batch["input_ids"].shape[1]:].numpy()


def read_events(path):
  """The `Event`s of one file of TFRecords (u64 length, its CRC, the bytes, their CRC); a record the
  writer has not finished yet ends the list."""
  data, i, events = path.read_bytes(), 0, []
  while i + 16 <= len(data):
    (n,) = struct.unpack_from("<Q", data, i)
    if i + 16 + n > len(data):
      break
    events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 16 + n
  return events


def read_scalars(path):
  """(step, tag, value) of every scalar in one event file, in the order written."""
  return [(e.step, v.tag, v.simple_value) for e in read_events(path) for v in e.summary.value]
