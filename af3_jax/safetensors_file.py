"""Reading one .safetensors file without copies: its tensors as read-only memory maps.

safetensors' numpy backend cannot return bfloat16 and its flax backend copies each tensor twice through
a device array, so the (simple, documented) format is read directly. Only safetensors are read: never
pickle.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

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
