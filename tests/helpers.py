"""Helpers the tests share (fixtures live in conftest.py): paths, model shapes, random inputs, the
torch reference, and comparisons."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the programs and bench/ run from here
