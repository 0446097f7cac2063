"""Padded sizes (`buckets.py`): how much padding each adds."""

from af3_jax.buckets import bucket, prompt_bucket, window_bucket


def test_audio_windows_pad_by_less_than_a_quarter():
  """Every window count a 10-minute clip (20 windows) or a batch of eight of them can need pads by less
  than 25 %, to one of few sizes (powers of two pad 20 windows to 32, 60 % more encoder work)."""
  counts = range(1, 8 * 20 + 1)
  for n in counts:
    assert n <= window_bucket(n) < 1.25 * n, n
  assert window_bucket(20) == 20 and bucket(20) == 32
  assert len({window_bucket(n) for n in range(1, 21)}) == 13  # powers of two: 6
  assert len({window_bucket(n) for n in counts}) == 25  # powers of two: 9


def test_prompts_past_512_tokens_pad_by_less_than_an_eighth():
  """Past 512 tokens a prompt pads to four significant bits: under 12.5 % more, where a power of two
  adds up to 100 %; up to 512, powers of two (at least the minimum), as before."""
  for n in range(513, 40_000):
    assert n <= prompt_bucket(n) < 1.125 * n, n
  assert [prompt_bucket(n, 64) for n in (1, 65, 300, 512, 513)] == [64, 128, 512, 512, 576]
  assert len({prompt_bucket(n, 64) for n in range(1, 32_769)}) == 52  # powers of two: 10


def test_audio_prompts_pad_by_a_few_percent_in_few_programs():
  """An audio prompt is 750 tokens a window plus text. Over the window counts up to 10 minutes that
  `window_bucket` keeps, with 16 to 200 tokens of text, prompts pad by 3-4 % on average (powers of two:
  36-43 %), at most 9 % (82 %), into 13 prefill lengths (5): 30 s of audio with 16 tokens of text
  (766) pads to 768, 10 minutes (15,016) to 15,360 (16,384)."""
  windows = sorted({window_bucket(n) for n in range(1, 21)})
  for text in (16, 40, 100, 200):
    prompts = [750 * w + text for w in windows]
    waste = [prompt_bucket(n, 64) / n - 1 for n in prompts]
    assert sum(waste) / len(waste) < 0.04 and max(waste) < 0.09, waste
    assert sum(bucket(n, 64) / n - 1 for n in prompts) / len(prompts) > 0.35
    assert len({prompt_bucket(n, 64) for n in prompts}) == 13 and len({bucket(n, 64) for n in prompts}) == 5
  assert prompt_bucket(766, 64) == 768 and prompt_bucket(15_016, 64) == 15_360 and bucket(15_016) == 16_384
