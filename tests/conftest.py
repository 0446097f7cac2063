"""Test setup: 8 fake CPU devices, float32 at highest matmul precision, tiny random AF3 checkpoints.

The checkpoints are written by `af3_jax.checkpoints.tiny` (what `python -m convert.tiny` writes for
users), whose every tensor is drawn at random (biases and norm weights included), so a wrong transpose,
bias or norm cannot hide behind an init of zeros and ones; PyTorch's reference model is transformers'
`from_pretrained` of that folder. transformers' own tester config is built by transformers and redrawn
alike.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("AF3_JAX_COMPILATION_CACHE", "off")  # the CLIs run here keep nothing in the user's cache

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import af3_jax  # noqa: E402
from af3_jax.checkpoints import tiny as tiny_checkpoint  # noqa: E402
from af3_jax.config import AF3Config, DecoderConfig, EncoderConfig, RoTEConfig  # noqa: E402

try:  # the PyTorch reference; tests that need it skip without it
  import torch
  import transformers
  from safetensors.torch import load_file, save_file
except ImportError:
  torch = None


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


@pytest.fixture(scope="session", params=TINY, ids=lambda t: t.name)
def ckpt(request, tmp_path_factory) -> Checkpoint:
  pytest.importorskip("torch")
  tiny = request.param
  root = tmp_path_factory.mktemp(tiny.name)
  model = torch_model_of(tiny.write(root / "tree"))
  model.save_pretrained(root / "hf", max_shard_size="100KB")
  write_nvidia_layout(model, root / "nvidia")
  return Checkpoint(tiny, model, root / "hf", root / "tree", root / "nvidia")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
  """The first tiny shape as `convert.tiny` writes it (tokenizer, chat template and processor config
  included), without generation defaults (`Tiny.write`)."""
  return TINY[0].write(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="session")
def gqa_ckpt(model_dir, tmp_path_factory) -> Checkpoint:
  """Only the first tiny config, for tests that need one checkpoint, not each: `model_dir`'s model, and
  the same saved by transformers."""
  pytest.importorskip("torch")
  model = torch_model_of(model_dir)
  root = tmp_path_factory.mktemp("single")
  model.save_pretrained(root / "hf")
  return Checkpoint(TINY[0], model, root / "hf", model_dir, root / "nvidia")


@pytest.fixture(scope="session")
def tester_ckpt(tmp_path_factory) -> Checkpoint:
  """transformers' tester config (`Tester`), saved by `save_pretrained` (hf only)."""
  pytest.importorskip("torch")
  tester = Tester()
  model = build_torch_model(tester, seed=0)  # this draw's greedy answers vary (test_generate needs them to)
  root = tmp_path_factory.mktemp(tester.name)
  model.save_pretrained(root / "hf")
  return Checkpoint(tester, model, root / "hf", root / "tree", root / "nvidia")


@pytest.fixture(scope="session")
def music_model_dir(tmp_path_factory) -> Path:
  """The tiny Music Flamingo (`MUSIC`) as `convert.tiny --model-type musicflamingo` writes it, without
  generation defaults (`Tiny.write`)."""
  return MUSIC.write(tmp_path_factory.mktemp("music_cli") / "model")


@pytest.fixture(scope="session")
def music_ckpt(music_model_dir, tmp_path_factory) -> Checkpoint:
  """`music_model_dir`'s model, and the same saved by transformers (no NVIDIA layout)."""
  pytest.importorskip("torch")
  model = torch_model_of(music_model_dir)
  root = tmp_path_factory.mktemp(MUSIC.name)
  model.save_pretrained(root / "hf")
  return Checkpoint(MUSIC, model, root / "hf", music_model_dir, root / "nvidia")


@pytest.fixture(scope="module")
def music_loaded(music_ckpt) -> af3_jax.Model:
  """Our float32 copy of `music_ckpt`."""
  return af3_jax.from_pretrained(music_ckpt.hf, dtype=jnp.float32)


@pytest.fixture(scope="module")
def loaded(ckpt) -> af3_jax.Model:
  """Our float32 copy of each tiny checkpoint."""
  return af3_jax.from_pretrained(ckpt.hf, dtype=jnp.float32)


@pytest.fixture(scope="module")
def gqa_loaded(gqa_ckpt) -> af3_jax.Model:
  """Our float32 copy of the single `gqa_ckpt`."""
  return af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32)


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


@contextlib.contextmanager
def compiles():
  """The names of the programs XLA compiles inside the block (jax's backend compile events, from any
  thread; a persistent cache hit counts too)."""
  from jax import monitoring

  names = []

  def listener(event, _, fun_name=None, **__):
    if event == "/jax/core/compile/backend_compile_duration":
      names.append(fun_name)

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    monitoring.unregister_event_duration_listener(listener)


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


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """The tiny checkpoints' tokenizer alone (`tiny_checkpoint.tokenizer`): byte-level BPE, `<sound>` id 299."""
  path = tmp_path_factory.mktemp("tokenizer")
  tiny_checkpoint.tokenizer(TINY[0].vocab).save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def music_tokenizer_dir(tmp_path_factory):
  """The tiny Music Flamingo's tokenizer alone: its audio bos/eos are ids 297 and 298 (`MUSIC`'s)."""
  path = tmp_path_factory.mktemp("music_tokenizer")
  tiny_checkpoint.tokenizer(MUSIC.vocab, music=True).save_pretrained(path)
  return path
