"""Inference: one answer generated in a single jitted loop or streamed (`decode`), the engine that
batches requests over cache slots (`engine`, `slots`, `requests`), and what `infer.py` runs on them
(`assistant`)."""
