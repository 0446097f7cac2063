"""Sharding checks: the (2, 2, 2) mesh of fake CPU devices and specs that fit their arrays."""

import math

import jax

from af3_jax import sharding


def mesh_222():
  return sharding.make_mesh((2, 2, 2))


def assert_specs_divide(shardings_tree, abstract_tree):
  """Every spec has the array's rank and each sharded dim divides by its mesh axes' product."""
  sharded = 0
  for s, a in zip(jax.tree.leaves(shardings_tree), jax.tree.leaves(abstract_tree), strict=True):
    spec = tuple(s.spec)
    assert len(spec) == len(a.shape), f"spec {s.spec} for an array of shape {a.shape}"
    for dim, axes in zip(a.shape, spec):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      assert dim % math.prod(s.mesh.shape[x] for x in axes) == 0
    sharded += any(x is not None for x in spec)
  assert sharded > 0  # the rules did shard something
