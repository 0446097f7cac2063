"""Checkpoint name tables and tensor transforms between upstream layouts and af3_jax parameters."""
