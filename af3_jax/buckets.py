"""Padded sizes: rows, prompt lengths, new-token budgets and audio windows are padded up to a few sizes,
so a new input mostly reuses a compiled program."""


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())
