"""TensorBoard event files: CRC-32C against its standard check value, and a written file read back by
an independent decoder (and by TensorBoard itself where it is installed)."""

import struct

import pytest

from af3_jax.tensorboard import EventWriter, crc32c


def test_crc32c_check_value():
  assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) check value


def _varint(buf, i):
  n = shift = 0
  while True:
    b = buf[i]
    n |= (b & 0x7F) << shift
    i, shift = i + 1, shift + 7
    if b < 0x80:
      return n, i


def _fields(buf):
  """(field number, value) pairs of a protobuf message, for the wire types events use."""
  i = 0
  while i < len(buf):
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    else:
      n, i = _varint(buf, i)
      value, i = buf[i:i + n], i + n
    yield number, value


def _masked(data):
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_scalars(path):
  data, i, out = path.read_bytes(), 0, []
  while i < len(data):
    (n,) = struct.unpack_from("<Q", data, i)
    assert struct.unpack_from("<I", data, i + 8)[0] == _masked(data[i:i + 8])
    payload = data[i + 12:i + 12 + n]
    assert struct.unpack_from("<I", data, i + 12 + n)[0] == _masked(payload)
    i += 16 + n
    event = dict(_fields(payload))
    for number, value in _fields(event.get(5, b"")):
      fields = dict(_fields(value))
      out.append((event[2], fields[1].decode(), struct.unpack("<f", fields[2])[0]))
  return out


def test_written_scalars_read_back(tmp_path):
  writer = EventWriter(tmp_path)
  writer.scalars(1, {"loss": 2.5, "lr": 1e-3})
  writer.scalars(2, {"loss": 2.0, "lr": 2e-3})
  got = read_scalars(writer.path)
  assert [(s, t) for s, t, _ in got] == [(1, "loss"), (1, "lr"), (2, "loss"), (2, "lr")]
  assert [v for *_, v in got] == pytest.approx([2.5, 1e-3, 2.0, 2e-3], rel=1e-6)
  try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  except ImportError:  # not a dependency; the decoder above checks the format
    return
  acc = EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
