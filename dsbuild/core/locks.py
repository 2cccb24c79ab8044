"""One writer at a time: an advisory lock per (build, stage, rank), per export, per decisions file.

A lock is ``fcntl.flock`` on a small file whose content says who holds it (PID, host, since
when). The kernel releases a flock when its process dies, so a killed run never blocks the
next one; the file's content then names a dead PID, and the next holder says it took over.
A second process either stops at once with who is writing, or waits (``--wait``).

A stage's sharding is locked too: every rank of one sharding holds that sharding's file
shared (``shared``), so the ranks run together while another sharding sees it held
(``busy``); ``exclusive`` serialises the brief check-and-take between them.
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
_told: set[str] = set()  # the locks this process said it waits for


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


def holder(path: str | os.PathLike) -> dict:
    """Who holds (or last held) the lock at ``path``, from its content; {} when unknown."""
    try:
        raw = Path(path).read_text()
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def waits() -> bool:
    """Whether this process waits for busy locks (``--wait``)."""
    return _wait


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``path`` alone for a brief critical section; always waited for, silently."""
    fd = _open(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def shared(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``path`` together with any other holders; ``busy`` sees it held meanwhile."""
    fd = _open(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def busy(path: str | os.PathLike) -> bool:
    """Whether another open file holds the lock at ``path`` (shared or exclusive)."""
    if not Path(path).exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock


def wait_free(path: str | os.PathLike) -> None:
    """Block until nobody holds the lock at ``path``."""
    fd = _open(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)


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
            if what not in _told:  # once per process: brief writes (decisions) wait often
                _told.add(what)
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
