"""Ends the Ray processes a driver started once the driver ends, however it ends (SIGKILL too).

``ray.init()`` without ``--ray-address`` starts a local Ray instance: its GCS and raylet die with
the driver (Ray's own fate-sharing), but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive a killed raylet by 60-120 s, reporting its death to the
GCS that is gone. :class:`dsbuild.executors.ray.RayActors` starts this process with a pipe on
its stdin and the PIDs of the processes Ray started; when the pipe closes (the driver closed
it, or died) it kills those still running and every process of that raylet (agents, workers:
its children when this started, and ``RAY_RAYLET_PID`` in their environment). Linux (/proc).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The start time of ``pid`` (so a PID reused since is never killed), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def children(parent: int) -> list[int]:
    """The processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1] == str(parent):
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def of_raylet(raylet: int) -> list[int]:
    """The processes whose environment names ``raylet`` as theirs."""
    mark = f"RAY_RAYLET_PID={raylet}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if mark in entry.joinpath("environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # ended meanwhile


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the driver's group: clean up
    raylet, *pids = (int(a) for a in sys.argv[1:])
    started = {pid: start_time(pid) for pid in (raylet, *pids, *children(raylet))}
    sys.stdin.read()  # returns once the driver closes the pipe or dies
    for pid in of_raylet(raylet):
        kill(pid)
    for pid, t in started.items():
        if t is not None and start_time(pid) == t:
            kill(pid)


if __name__ == "__main__":
    main()
