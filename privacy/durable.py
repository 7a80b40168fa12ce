"""Crash-safe file writes, for everything whose loss or corruption would cost privacy:
budgets, face models, run status. After a crash a file is the old one or the new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, fsync it, rename it, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_json(path: Path, obj: object) -> None:
    """`atomic_write_bytes` of `obj` as JSON (no NaN or infinity: JSON has none)."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False, default=str).encode())
