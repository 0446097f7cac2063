"""The float32 parity bound and its check: ours against a reference, relative to the reference's scale."""

import numpy as np

RTOL = 1e-4  # float32 parity bound, relative to the reference's largest magnitude


def assert_close(ours, ref, rtol: float = RTOL, scale: float | None = None) -> None:
  """max |ours - ref| <= rtol * scale, the scale being max |ref| unless given; shapes must be equal."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  scale = np.abs(ref).max() if scale is None else scale
  err = np.abs(ours - ref).max()
  assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} * {scale:.3g}"
