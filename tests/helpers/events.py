"""TensorBoard event files read back, record by record, without TensorBoard."""

import struct

from tensorboardX.proto import event_pb2


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
