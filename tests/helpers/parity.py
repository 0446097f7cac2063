"""The float32 parity bound and its check: ours against a reference, relative to the reference's scale;
our states flattened to compare leaf by leaf with the reference's named parameters."""

import numpy as np
from flax import nnx, traverse_util

RTOL = 1e-4  # float32 parity bound, relative to the reference's largest magnitude


def assert_close(ours, ref, rtol: float = RTOL, scale: float | None = None) -> None:
  """max |ours - ref| <= rtol * scale, the scale being max |ref| unless given; shapes must be equal."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  scale = np.abs(ref).max() if scale is None else scale
  err = np.abs(ours - ref).max()
  assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} * {scale:.3g}"


def flat(state):
  """An nnx state as {path tuple: array}."""
  return traverse_util.flatten_dict(nnx.to_pure_dict(state))
