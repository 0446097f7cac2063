"""Padded sizes (`buckets.py`): how much padding each adds."""

from af3_jax.buckets import bucket, window_bucket


def test_audio_windows_pad_by_less_than_a_quarter():
  """Every window count a 10-minute clip (20 windows) or a batch of eight of them can need pads by less
  than 25 %, to one of few sizes (powers of two pad 20 windows to 32, 60 % more encoder work)."""
  counts = range(1, 8 * 20 + 1)
  for n in counts:
    assert n <= window_bucket(n) < 1.25 * n, n
  assert window_bucket(20) == 20 and bucket(20) == 32
  assert len({window_bucket(n) for n in range(1, 21)}) == 13  # powers of two: 6
  assert len({window_bucket(n) for n in counts}) == 25  # powers of two: 9
