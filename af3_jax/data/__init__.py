"""Data: the upstream manifest format (grain pipelines for training come with train.py)."""
