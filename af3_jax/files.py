"""Small file writes that must never leave a half-written file behind."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
  """Replaces `path` with `text` through a temporary file beside it: a crash leaves the old file or
  the new one, never a mix."""
  temporary = path.with_name(f".{path.name}.tmp")
  with open(temporary, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)
