"""Padded sizes: rows, prompt lengths, new-token budgets and audio windows are padded up to a few sizes,
so a new input mostly reuses a compiled program."""

_FINE_ABOVE = 512  # prompt lengths past this pad to four significant bits, not to a power of two


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def significant(n: int, bits: int) -> int:
  """The smallest number >= n with at most `bits` significant binary digits (m * 2**k, m < 2**bits)."""
  shift = max(n.bit_length() - bits, 0)
  return -(-n >> shift) << shift


def prompt_bucket(n: int, minimum: int = 1) -> int:
  """The padded length of an n-token prompt: a power of two up to 512 (at least `minimum`), then four
  significant binary digits: 576, 640, ..., 960, 1,024, 1,152, ..., 15,360, 16,384, 18,432, ...

  Prefill work grows with the padded length. Audio prompts are about 750 tokens a 30 s window plus
  some text, and powers of two pad them by up to 80 % (30 s: ~790 -> 1,024; 10 minutes: 15,016 ->
  16,384); here consecutive sizes differ by at most an eighth (30 s: 832, 10 minutes: 15,360). The
  price is eight programs a doubling where a power of two has one, but the audio lengths that
  `window_bucket` allows fall in 13 of them up to 10 minutes (powers of two: 5), and a program is
  compiled only for the buckets prompts reach (docs/performance.md#padded-sizes).
  """
  return bucket(n, minimum) if n <= _FINE_ABOVE else significant(n, 4)


def window_bucket(n: int) -> int:
  """The padded number of 30 s audio windows: the smallest number >= max(n, 1) with at most three
  significant binary digits (m * 2**k, m < 8): 1 to 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...

  The audio encoder's work grows with the windows, and a power of two wastes up to half of it (10
  minutes, 20 windows, padded to 32: 60 % more). Neighbours here differ by at most a quarter of the
  smaller, so padding adds less than 25 %, for four programs per doubling; whole minutes up to 8 (two
  windows a minute) and 10 minutes, the longest audio, are buckets of their own.
  """
  return max(significant(n, 3), 1)
