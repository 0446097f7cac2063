"""Scalar TensorBoard event files, written directly (none of our dependencies writes them without
TensorFlow).

An event file is a sequence of TFRecords (u64 length, masked CRC-32C of the length, the bytes, masked
CRC-32C of the bytes), each holding an `Event` protobuf: wall_time (field 1, double), step (2, int64),
file_version (3, string) or summary (5) of values (1) with tag (1, string) and simple_value (2, float).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def event(step: int, *, scalars: dict[str, float] | None = None, file_version: str | None = None) -> bytes:
  """One serialized `Event`."""
  body = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
  if file_version is not None:
    body += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                      for tag, v in scalars.items())
    body += _bytes_field(5, values)
  return body


def record(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + _masked(length) + data + _masked(data)


class EventWriter:
  """Appends scalar summaries to `events.out.tfevents.<time>.<host>` in `logdir`."""

  def __init__(self, logdir: Path):
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    with open(self.path, "ab") as f:
      f.write(record(event(0, file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    with open(self.path, "ab") as f:
      f.write(record(event(step, scalars=values)))
