"""Crash-safe file writes, for everything whose loss or corruption would cost privacy:
budgets, face models, run status, anonymized files. After a crash a file is the old one or the
new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def atomic_write(path: Path, write: Callable[[Path], T], suffix: str = ".tmp") -> T:
    """Return `write(tmp)` for a temporary file beside `path` (named with `suffix`: writers
    such as OpenCV's pick the format by it), fsynced and renamed to `path`, the folder fsynced.
    If `write` raises, the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        result = write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return result


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write` of `data`."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, obj: object) -> None:
    """`atomic_write_bytes` of `obj` as JSON (no NaN or infinity: JSON has none)."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False, default=str).encode())
