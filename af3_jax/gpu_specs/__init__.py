"""XLA's descriptions of the GPUs `af3_jax.targets` compiles for (data files, Apache-2.0, OpenXLA)."""
