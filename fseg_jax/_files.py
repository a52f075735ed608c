"""Atomic file writes, shared by everything that writes files (models, banks, label maps, slide outputs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; it replaces ``path`` only if the block completes.

    The temporary is ``.<name>.<pid>.tmp<suffix>`` in the same folder (same file system, so the rename is
    atomic; same suffix, so writers that append a missing one, like ``numpy.save``, keep the name). Its
    contents are flushed to disk before the rename; on any error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
