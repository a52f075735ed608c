"""One run at a time in a slide's output folder: an flock on ``<slide out dir>/.fseg-lock``.

The holder writes who it is (pid, host, since when, and for a multi-process run which process) into the
lock file, so that a run refused names the one that holds the folder. The lock goes when the holding
process ends, however it ends (the kernel releases it); a clean release also removes the file, and a
process that got the lock of a file removed meanwhile takes the one now at the path instead. Holding is
re-entrant within a thread (the pipeline holds the folder across a run and its merge); another thread or
process is refused, or waits with ``wait=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".fseg-lock"

_held = threading.local()  # {resolved folder: depth} of the folders this thread holds


class FolderBusy(RuntimeError):
    """Another run holds the slide output folder."""


@contextlib.contextmanager
def hold_folder(folder: str | Path, *, wait: bool = False, role: str = "") -> Iterator[None]:
    """Hold `folder`'s lock for the block (creating the folder, and removing it again when the block leaves it
    empty); FolderBusy naming the holder when another run holds it, or with `wait` block until it is free.
    role: what the holder file says this run is, besides its pid and host (e.g. "process 1 of 4")."""
    folder = Path(folder)
    key = str(folder.resolve())
    held = _held.__dict__.setdefault("folders", {})
    if key in held:
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    fd, created = _acquire(folder, wait)
    try:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**me, **({"role": role} if role else {})}).encode(), 0)
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
            (folder / LOCK_NAME).unlink(missing_ok=True)  # still held: no one can have locked the path since
            for path in created:  # a run that wrote nothing leaves no folder behind
                try:
                    path.rmdir()
                except OSError:  # not empty: something was written, or another run made it meanwhile
                    break
    finally:
        os.close(fd)


def process_role(process: tuple[int, int]) -> str:
    """How a lock names process (index, count) of a multi-process run ("" for a one-process run)."""
    return f"process {process[0]} of {process[1]}" if process[1] > 1 else ""


def _acquire(folder: Path, wait: bool) -> tuple[int, list[Path]]:
    """(a descriptor holding the lock of `folder`, the folders made for it, deepest first)."""
    import fcntl

    path = folder / LOCK_NAME
    created: list[Path] = []
    while True:
        # (again after a holder let go: it removes the folder it made when it leaves it empty)
        created += [p for p in (folder, *folder.parents) if not p.exists() and p not in created]
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise FolderBusy(
                f"{folder} is in use by another run ({holder}): run again once it has finished, or pass "
                "--wait (wait=True) to wait for it"
            ) from None
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is not None and (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
            return fd, sorted(created, key=lambda p: -len(p.parts))
        os.close(fd)  # the holder removed the file as it let go: lock the one at the path now


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if "pid" not in info:
        return "a process that is just starting"
    role = f", {info['role']}" if info.get("role") else ""
    return f"pid {info['pid']} on {info.get('host', '?')}{role}, since {info.get('since', '?')}"
