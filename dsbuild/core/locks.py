"""One writer at a time: an advisory lock per (build, stage, rank), per export, per decisions file.

A lock is ``fcntl.flock`` on a small file whose content says who holds it (PID, host, since
when). The kernel releases a flock when its process dies, so a killed run never blocks the
next one; the file's content then names a dead PID, and the next holder says it took over.
A second process either stops at once with who is writing, or waits (``--wait``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dsbuild.core.errors import DsbuildError

_wait = False


class Busy(DsbuildError):
    """Another process holds the lock (exit status 2)."""


def set_wait(wait: bool) -> None:
    """Whether a busy lock is waited for (``--wait``) instead of refused."""
    global _wait
    _wait = bool(wait)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    if not info:
        return "another process"
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str, *, wait: bool | None = None) -> Iterator[None]:
    """Hold the lock at ``path`` while the block runs; ``what`` names the work in messages."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wait = _wait if wait is None else wait
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            if not wait:
                raise Busy(f"{what} is being written by {describe(info)}; wait for it to "
                           "finish, or rerun with --wait") from None
            print(f"waiting: {what} is being written by {describe(info)}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        prev = _holder(fd)
        host = socket.gethostname()
        if prev.get("pid") and prev.get("host") == host and not _alive(int(prev["pid"])):
            print(f"note: {what} was left by PID {prev['pid']} (no longer running, since "
                  f"{prev.get('since', '?')}); taking over and resuming its work", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({
            "pid": os.getpid(), "host": host,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "what": what,
        }).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: nobody to take over from
    finally:
        os.close(fd)  # closing releases the flock
