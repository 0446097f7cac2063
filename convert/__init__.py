"""Command-line tools: `python -m convert.from_hf` (a checkpoint to our orbax layout) and
`python -m convert.to_hf` (a training run to transformers' layout). The key-name tables they use live
in `af3_jax/checkpoints/names.py`."""
