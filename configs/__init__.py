"""Training configs: one per curriculum stage, built on common.py."""
