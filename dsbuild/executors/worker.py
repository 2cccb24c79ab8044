"""A local worker process: ranks in on stdin (one JSON task a line), answers out, one a line.

Started by :class:`dsbuild.executors.local.LocalProcesses`. The answer channel is a copy of the
original stdout taken before anything runs: the stage's own output goes to the rank's log
(BUILD/logs/<stage>/rNNNNN.log), never into the answers.
"""

from __future__ import annotations

import json
import os
import sys


def die_with_parent() -> None:
    """Linux: be killed when the driver dies, so no orphan keeps a rank's lock."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> None:
    die_with_parent()
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray output between ranks goes nowhere, not into the answers
    from dsbuild.executors.base import run_rank
    from dsbuild.executors.local import encode

    worker = os.environ.get("DSBUILD_WORKER", f"local-{os.getpid()}")
    for line in sys.stdin:
        if not line.strip():
            continue
        run = run_rank(**json.loads(line), worker=worker)  # a Task's fields
        answers.write(encode(run) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
