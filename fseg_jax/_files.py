"""Atomic file writes, shared by everything that writes files (models, banks, label maps, slide outputs)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

_FULL_BYTES = 1 << 16  # a folder with less free space than this after a short write is on a full disk


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of ``paths`` to write to; they replace ``paths`` together, only if
    the block completes.

    Each temporary is ``.<name>.<pid>.tmp<suffix>`` in its target's folder (same file system, so the rename
    is atomic; same suffix, so writers that append a missing one, like ``numpy.save``, keep the name). Their
    contents are flushed to disk before the renames. On any error (Ctrl-C included) the temporaries are
    removed and so are the targets already renamed, so the set is written whole or not at all. An OSError
    while writing names the target, not its temporary (a short write on a full disk is reported as ENOSPC).
    """
    paths = [Path(p) for p in paths]
    tmps = [p.with_name(f".{p.name}.{os.getpid()}.tmp{p.suffix}") for p in paths]
    replaced: list[Path] = []
    try:
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
            replaced.append(path)
    except OSError as err:
        raise _naming_target(err, paths, tmps) from err
    finally:
        if len(replaced) < len(paths):
            for path in replaced:
                path.unlink(missing_ok=True)
        for tmp in tmps:
            if tmp.exists():  # (an unlink of one never made can fail too: its folder may be read-only or a file)
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; it replaces ``path`` only if the block completes
    (:func:`atomic_paths` for one file)."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def _naming_target(err: OSError, paths: list[Path], tmps: list[Path]) -> OSError:
    """`err` as it would read had the writer written the target itself: the target's name in place of its
    temporary's (or in place of no name), ENOSPC for a short write that filled the disk."""
    names = {os.fspath(t): p for t, p in zip(tmps, paths)}
    if err.filename is not None and os.fspath(err.filename) not in names:
        return err  # about another file (one the block read, say): already named
    path = names.get(os.fspath(err.filename)) if err.filename is not None else paths[0]
    if len(paths) > 1 and err.filename is None:
        written = [p for t, p in zip(tmps, paths) if t.exists()]  # the last temporary begun is the one that failed
        path = written[-1] if written else paths[0]
    code, reason = err.errno, err.strerror
    if code is None:  # e.g. numpy's "N requested and M written"
        if _nearly_full(path.parent):
            code, reason = errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({err})"
        else:
            return OSError(f"cannot write {path}: {err}")
    return OSError(code, reason, str(path))


def _nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no such folder, or no statvfs (Windows)
        return False
    return st.f_bavail * st.f_frsize < _FULL_BYTES
