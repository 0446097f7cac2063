"""Padded sizes: rows, prompt lengths, new-token budgets and audio windows are padded up to a few sizes,
so a new input mostly reuses a compiled program."""


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def window_bucket(n: int) -> int:
  """The padded number of 30 s audio windows: the smallest number >= max(n, 1) with at most three
  significant binary digits (m * 2**k, m < 8): 1 to 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...

  The audio encoder's work grows with the windows, and a power of two wastes up to half of it (10
  minutes, 20 windows, padded to 32: 60 % more). Neighbours here differ by at most a quarter of the
  smaller, so padding adds less than 25 %, for four programs per doubling; whole minutes up to 8 (two
  windows a minute) and 10 minutes, the longest audio, are buckets of their own.
  """
  shift = max(n.bit_length() - 3, 0)
  return max(-(-n >> shift) << shift, 1)
