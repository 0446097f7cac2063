"""Finding and reading checkpoints: upstream safetensors in every released layout, and our orbax copies.

Upstream tensors stream one parameter at a time, straight into the target dtype and sharding, so host
memory peaks at the model plus its largest (stacked) parameter. Only safetensors are read: never pickle.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from af3_jax import names
from af3_jax.config import AF3Config, decoder_config, encoder_config, parse_json, read_json
from af3_jax.models import layers
from af3_jax.safetensors_file import SafetensorsFile

ORBAX_PARAMS = "params"  # our converted checkpoints: config.json + orbax tree in this subfolder
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
_ORBAX_TREE = "_METADATA"  # what every finished orbax tree holds (its structure)
_INDEX = "model.safetensors.index.json"
# Rewritten by whoever writes a model; trainer_state.json records a training run's step (trainer.py).
_MODEL_FILES = {"config.json", _INDEX, "trainer_state.json"}


def resolve(path_or_hub_id: str | Path) -> Path:
  """A local checkpoint folder, or a hub id resolved through huggingface_hub (local cache first)."""
  path = Path(path_or_hub_id).expanduser()
  if path.exists():
    if not path.is_dir():
      raise ValueError(f"{path}: not a checkpoint directory")
    return path
  hub_id = str(path_or_hub_id)
  if not re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
    raise ValueError(f"{hub_id}: no such checkpoint directory")
  import huggingface_hub  # only needed for hub ids

  try:
    return Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=_HUB_FILES, local_files_only=True))
  except Exception:  # not cached: fall through to a download
    pass
  try:
    return Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=_HUB_FILES))
  except Exception as e:
    raise ValueError(f"{hub_id}: not a local folder and not downloadable here ({type(e).__name__}); "
                     f"fetch it with `hf download {hub_id}` where there is network, then pass the folder") from None


def think_adapter(root: Path) -> Path:
  """The checkpoint's think-mode LoRA folder: think/ (transformers' release) or stage35/ (NVIDIA's)."""
  for name in ("think", "stage35"):
    if (root / name / "adapter_config.json").is_file():
      return root / name
  raise ValueError(f"{root}: --think needs a think/ or stage35/ adapter folder beside the weights")


def layout(root: Path) -> str:
  """'orbax' (ours), 'nvidia' (llm/ + sound_tower/ + sound_mm_projector/) or 'hf' (one folder).

  Decided by the weights really there: a `params/` folder that is not a finished orbax checkpoint (a
  user's stray folder) does not count, and orbax weights beside safetensors are an error, not a guess.
  """
  nvidia = all((root / f).is_dir() for f in names.NVIDIA_FOLDERS)
  upstream = nvidia or any(root.glob("*.safetensors")) or (root / _INDEX).is_file()
  if (root / ORBAX_PARAMS / _ORBAX_TREE).is_file():
    if upstream:
      raise ValueError(f"{root}: holds both safetensors and an orbax checkpoint in {ORBAX_PARAMS}/; "
                       "keep only one of them")
    return "orbax"
  if nvidia:
    return "nvidia"
  if (root / "config.json").is_file():
    return "hf"
  raise ValueError(f"{root}: not an AF3 checkpoint (no config.json, and not the NVIDIA llm/ + sound_tower/ "
                   "+ sound_mm_projector/ layout)")


def tokenizer_dir(root: Path) -> Path:
  """Where the tokenizer files are: `llm/` in the NVIDIA layout, the root otherwise (also a bare tokenizer)."""
  return root / "llm" if all((root / f).is_dir() for f in names.NVIDIA_FOLDERS) else root


def model_type(root: Path) -> str:
  """The family of a checkpoint folder (`config.MODEL_TYPES`), from its config.json; AF3 for the NVIDIA
  layout and for a folder without one (a bare tokenizer)."""
  config = root / "config.json"
  if tokenizer_dir(root) != root or not config.is_file():
    return "audioflamingo3"
  return AF3Config.from_json(config).model_type


def read_config(root: Path) -> AF3Config:
  if layout(root) != "nvidia":
    return AF3Config.from_json(root / "config.json")
  return AF3Config(encoder=parse_json(root / "sound_tower" / "config.json", encoder_config),
                   decoder=parse_json(root / "llm" / "config.json", decoder_config),
                   audio_token_id=_sound_token_id(root / "llm"))


def _sound_token_id(tok_dir: Path) -> int:
  """The `<sound>` id from the NVIDIA tokenizer files (151669 in the release)."""
  added = tok_dir / "added_tokens.json"
  if added.is_file() and isinstance(sound := read_json(added).get("<sound>"), int):
    return sound
  full = tok_dir / "tokenizer.json"
  tokens = read_json(full).get("added_tokens") if full.is_file() else None
  for tok in tokens if isinstance(tokens, list) else []:
    if isinstance(tok, dict) and tok.get("content") == "<sound>" and isinstance(tok.get("id"), int):
      return tok["id"]
  raise ValueError(f"{tok_dir}: no <sound> token in added_tokens.json or tokenizer.json")


def _safetensors_files(folder: Path) -> list[Path]:
  """The shards of one folder: from the index json if present, else every *.safetensors file."""
  index = folder / _INDEX
  if index.is_file():
    return sorted({folder / f for f in parse_json(index, _weight_map).values()})
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{folder}: no .safetensors files (only safetensors checkpoints are read)")
  return files


def _weight_map(index: dict[str, Any]) -> dict[str, str]:
  """The index's tensor name -> shard file name map."""
  weight_map = index.get("weight_map")
  if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
    raise ValueError("weight_map must map tensor names to file names")
  return weight_map


def tensor_sources(root: Path) -> dict[str, tuple[Path, str]]:
  """Canonical key -> (file, key in file) for every tensor of an upstream checkpoint."""
  if layout(root) == "nvidia":
    folders = [(root / f, names.NVIDIA_PREFIXES[f]) for f in names.NVIDIA_FOLDERS]
  else:
    folders = [(root, names.HF_PREFIXES)]
  sources, unknown = {}, []
  for folder, prefixes in folders:
    for file in _safetensors_files(folder):
      for key in SafetensorsFile(file).keys():
        canon = names.canonical(key, prefixes)
        if canon is None:
          unknown.append(f"{file.relative_to(root)}:{key}")
        else:
          sources[canon] = (file, key)
  if unknown:
    raise ValueError(f"{root}: unexpected checkpoint keys: {', '.join(sorted(unknown))}")
  return sources


def _plan(sources: dict[str, tuple[Path, str]], files: dict[Path, SafetensorsFile],
          abstract: dict) -> dict[tuple, dict[int | None, str]]:
  """Our path -> {layer: canonical key}, after checking names and shapes against the model."""
  plan, unexpected, bad_shapes = {}, [], []
  for canon, (file, key) in sources.items():
    try:
      path, layer, transform = names.param_path(canon)
    except KeyError:
      path = None
    if path not in abstract:
      unexpected.append(canon)
      continue
    want = abstract[path].shape[1:] if layer is not None else abstract[path].shape
    shape = files[file].shape(key)
    got = names.torch_to_ours(np.empty(shape, np.int8), transform).shape
    if got != tuple(want):
      bad_shapes.append(f"{canon}: checkpoint {shape} vs model {tuple(want)} ({transform} layout)")
    plan.setdefault(path, {})[layer] = canon
  missing = []
  for path, var in abstract.items():
    if path[-1] == names.INT8_SCALE:
      continue
    have = plan.get(path, {})
    missing += [names.hf_key(path, i) for i in names.layers_of(path, var.shape) if i not in have]
  problems = [(f"missing keys: {', '.join(sorted(missing))}", missing),
              (f"unexpected keys: {', '.join(sorted(unexpected))}", unexpected),
              (f"shape mismatches: {'; '.join(bad_shapes)}", bad_shapes)]
  if any(bad for _, bad in problems):
    raise ValueError("; ".join(msg for msg, bad in problems if bad))
  return plan


def load_safetensors(root: Path, abstract_state: nnx.State, shardings: nnx.State) -> nnx.State:
  """Streams an upstream checkpoint into `abstract_state`'s dtypes and `shardings`.

  An int8 kernel with a `names.INT8_SCALE` beside it (a quantised model) is quantised here on the host,
  layer by layer as it streams in, so neither host nor device ever holds its float form whole.
  """
  sources = tensor_sources(root)
  files = {f: SafetensorsFile(f) for f in {f for f, _ in sources.values()}}
  abstract = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_state))
  target = traverse_util.flatten_dict(nnx.to_pure_dict(shardings))
  loaded = {}

  def put(path, buffer):
    loaded[path] = jax.make_array_from_callback(buffer.shape, target[path], lambda idx: buffer[idx])
    # Transfers are asynchronous and keep their host buffer alive; waiting bounds the peak to one buffer.
    loaded[path].block_until_ready()

  for path, by_layer in _plan(sources, files, abstract).items():
    spec = abstract[path]
    scale_path = (*path[:-1], names.INT8_SCALE)
    buffer = np.empty(spec.shape, spec.dtype)  # the one host copy of this parameter
    quantized = path[-1] == "kernel" and scale_path in abstract
    scales = np.empty(abstract[scale_path].shape, np.float32) if quantized else None
    for layer, canon in by_layer.items():
      file, key = sources[canon]
      at = () if layer is None else layer
      # Casting assignment from the memory map: no intermediate copy in the source dtype.
      tensor = names.torch_to_ours(files[file].get(key), names.param_path(canon)[2])
      if scales is None:
        buffer[at] = tensor
      else:
        buffer[at], scales[at] = layers.int8_per_channel(tensor)
    put(path, buffer)
    if scales is not None:
      put(scale_path, scales)
  nnx.replace_by_pure_dict(abstract_state, traverse_util.unflatten_dict(loaded))
  return abstract_state


# transformers' largest shard by default (`save_pretrained(max_shard_size="5GB")`).
SHARD_BYTES = 5 * 2**30


def torch_tensors(state: nnx.State):
  """(module-tree key, numpy tensor in torch's layout) for every parameter, one layer at a time."""
  for path, x in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items():
    for layer in names.layers_of(path, x.shape):
      canon = names.hf_key(path, layer)
      value = np.asarray(jax.device_get(x[layer] if layer is not None else x))
      yield names.module_tree_key(canon), np.ascontiguousarray(names.ours_to_torch(value, names.param_path(canon)[2]))


def save_safetensors(state: nnx.State, dst: Path, shard_bytes: int = SHARD_BYTES) -> None:
  """`state` as transformers' safetensors in the folder `dst`: shards of at most `shard_bytes` and, when
  there are several, `model.safetensors.index.json`."""
  shards, current, size = [], {}, 0
  for key, value in torch_tensors(state):
    if current and size + value.nbytes > shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = value
    size += value.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], dst / "model.safetensors", metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards, 1):
    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, dst / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
  index = {"metadata": {"total_size": sum(v.nbytes for s in shards for v in s.values())}, "weight_map": weight_map}
  (dst / _INDEX).write_text(json.dumps(index, indent=2) + "\n")

def save_model(dst: Path, config: AF3Config, state: nnx.State, files_from: Path) -> None:
  """Writes a folder `from_pretrained` reads: `config.json`, the parameters as an orbax tree under
  `params/`, and the tokenizer, generation and processor files found in `files_from`.

  It is written to `.<name>.partial` beside `dst` and renamed at the end, so an interrupted write never
  leaves a half-written `dst`; an existing `dst` is never overwritten. In a multi-process run every
  process calls this (orbax saves collectively, to a filesystem they share); the fixed temporary name
  lets them meet there, and process 0 alone writes the small files and renames.
  """
  import orbax.checkpoint as ocp

  if dst.exists():  # every process checks, and fails alike, before the first barrier
    raise ValueError(f"{dst}: already exists; choose a new output folder")
  tmp = dst.parent / f".{dst.name}.partial"
  primary = jax.process_index() == 0
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write
    tmp.mkdir(parents=True)
  sync_processes("save_model_start")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((tmp / ORBAX_PARAMS).absolute(), nnx.to_pure_dict(state))
  if primary:
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    copy_side_files(files_from, tmp)
    tmp.rename(dst)
  sync_processes("save_model_done")  # nobody reads dst before it is in place


def copy_side_files(src: Path, dst: Path) -> None:
  """The tokenizer, generation and processor files of a model folder (not its weights or config)."""
  for f in src.iterdir():
    if f.is_file() and f.name not in _MODEL_FILES and f.suffix != ".safetensors":
      shutil.copy2(f, dst / f.name)


def sync_processes(name: str) -> None:
  """A barrier of every process of a multi-process run; nothing for one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def orbax_dtype(root: Path) -> np.dtype:
  """The dtype our orbax checkpoint stores its parameters in (the widest, if they differ), from its metadata."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata((root / ORBAX_PARAMS).absolute()).item_metadata
  dtypes = [leaf.dtype for leaf in jax.tree.leaves(tree)]
  if not dtypes:
    raise ValueError(f"{root / ORBAX_PARAMS}: not an orbax checkpoint (no parameter metadata)")
  return np.dtype(jnp.result_type(*dtypes))


def load_orbax(root: Path, abstract_state: nnx.State, shardings: nnx.State) -> nnx.State:
  """Restores our converted checkpoint into `abstract_state`'s dtypes and `shardings`."""
  import orbax.checkpoint as ocp

  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
  folder = (root / ORBAX_PARAMS).absolute()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      # Checked before reading: a restore that fails part-way leaves tensorstore's reads of the other
      # arrays running after it returns, to fail later against a closed event loop.
      _check_orbax_tree(ckptr.metadata(folder).item_metadata, target)
      restored = ckptr.restore(folder, target)
  except (ValueError, OSError) as e:  # a damaged tree, or one config.json does not describe
    raise ValueError(f"{root / ORBAX_PARAMS}: cannot restore this orbax checkpoint with {root / 'config.json'} "
                     f"({' '.join(str(e).split())})") from None
  nnx.replace_by_pure_dict(abstract_state, restored)
  return abstract_state


def _check_orbax_tree(saved, target) -> None:
  """Raises ValueError naming the parameters `target` lacks or has beyond the saved tree, and those
  whose saved shape differs."""
  shapes = lambda tree: {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)).items()}
  have, want = shapes(saved), shapes(target)
  missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
  problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
             ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + \
             [f"{k}: saved {have[k]}, config.json says {want[k]}" for k in sorted(have.keys() & want.keys())
              if have[k] != want[k]]
  if problems:
    raise ValueError("; ".join(problems))
