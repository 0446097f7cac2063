"""Upstream safetensors: one file read without copies (its tensors as read-only memory maps), a whole
checkpoint streamed into the model one parameter at a time, and a model written back in transformers'
layout.

safetensors' numpy backend cannot return bfloat16 and its flax backend copies each tensor twice through
a device array, so the (simple, documented) format is read directly. Upstream tensors stream straight
into the target dtype and sharding, so host memory peaks at the model plus its largest (stacked)
parameter. Only safetensors are read: never pickle.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from af3_jax.checkpoints import names
from af3_jax.checkpoints.locate import INDEX, layout
from af3_jax.config import parse_json
from af3_jax.models import layers

_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the header (MAX_HEADER_SIZE)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
  """One .safetensors file, its tensors as read-only memory maps (no copy until they are used).

  The format: a little-endian u64 header size, a JSON header of {name: {dtype, shape, data_offsets}},
  then the raw bytes.
  """

  def __init__(self, path: Path):
    self.path = path
    try:
      self.header, self.data_start = _read_header(path)
    except (OSError, struct.error, UnicodeDecodeError, RecursionError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a readable safetensors file ({e})") from None

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    entry = self.header[key]
    dtype = np.dtype(_DTYPES[entry["dtype"]])
    if not entry["shape"] or 0 in entry["shape"]:
      return np.zeros(entry["shape"], dtype)
    return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + entry["data_offsets"][0],
                     shape=tuple(entry["shape"]))


def _read_header(path: Path) -> tuple[dict, int]:
  """(header without `__metadata__`, offset of the data) of a safetensors file, every entry checked to
  lie inside the file; raises ValueError (or the parsing error) for anything else."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    # Bounded before reading: a corrupt length would otherwise ask for exabytes (OverflowError, MemoryError).
    if n > (limit := min(size - 8, _MAX_HEADER_BYTES)):
      raise ValueError(f"header length {n} is impossible (at most {limit} bytes here)")
    header = json.loads(f.read(n))
  if not isinstance(header, dict):
    raise ValueError("the header is not a JSON object")
  header.pop("__metadata__", None)
  for key, entry in header.items():
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    if not all(isinstance(d, int) and d >= 0 for d in shape):
      raise ValueError(f"{key!r}: bad shape {shape!r}")
    nbytes = math.prod(shape) * np.dtype(_DTYPES[entry["dtype"]]).itemsize
    if not (isinstance(begin, int) and 0 <= begin <= end <= size - 8 - n and end - begin == nbytes):
      raise ValueError(f"{key!r}: tensor bytes out of range")
  return header, 8 + n


def _safetensors_files(folder: Path) -> list[Path]:
  """The shards of one folder: from the index json if present, else every *.safetensors file."""
  index = folder / INDEX
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
  (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
