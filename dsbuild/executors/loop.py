"""The one scheduling loop of the worker executors (local processes, Ray actors).

Ranks go to whichever worker is free; a worker lost mid-rank (killed, out of memory, its node
gone) is a system failure: a new worker takes its slot and the rank runs again there, where its
partial shard resumes, up to ``--max-retries`` times. An error the stage raises is an
application error: the run stops at once and names the rank. One progress bar in the driver.
A backend only starts, feeds, watches and stops its workers (:class:`Backend`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dsbuild.core.build import Build
from dsbuild.executors.base import (
    DriverProgress,
    Executor,
    ExecutorOptions,
    RankRun,
    ShardFailed,
    Task,
    failure,
    log_path,
)

POLL_S = 0.5


@dataclass
class Outcome:
    """What a backend saw of the worker in ``slot``: its rank's run, or (``run`` None) that
    the worker is gone and why (``exit status -9``, ``ActorDiedError``)."""

    slot: int
    worker: str
    run: RankRun | None = None
    lost: str = ""


class Backend(Protocol):
    """Workers in numbered slots, each running one :class:`Task` at a time."""

    name: str

    def start(self, workers: int) -> None:
        """Have a live worker in every slot ``0 .. workers - 1``."""

    def submit(self, slot: int, task: Task) -> None:
        """Hand ``task`` to the (idle) worker in ``slot``."""

    def poll(self, timeout: float) -> list[Outcome]:
        """What the workers came to within ``timeout`` seconds (often nothing)."""

    def replace(self, slot: int) -> str:
        """Start a new worker in ``slot``, whose worker is gone; its id."""

    def kill(self) -> None:
        """Stop every worker now (the run stops; their ranks resume on the next run)."""

    def close(self) -> None:
        """Stop the workers and release what the backend started (a Ray instance)."""


class WorkerPool(Executor):
    """Ranks on the workers of ``backend`` (``--workers N``), shard after shard."""

    in_process = False

    def __init__(self, backend: Backend, options: ExecutorOptions | None = None,
                 echo: Callable[[str], None] = print):
        super().__init__(options, echo)
        self.backend = backend
        self.name = backend.name

    def close(self) -> None:
        self.backend.close()

    def run_ranks(self, build: Build, stage: str, world_size: int, ranks: list[int],
                  force: bool) -> list[RankRun]:
        self.backend.start(self.workers)
        root = str(build.root.resolve())
        pending = deque(ranks)
        attempts = dict.fromkeys(ranks, 0)
        idle = list(range(self.workers))
        running: dict[int, int] = {}  # slot -> rank
        runs: list[RankRun] = []
        bar = DriverProgress(build, stage, world_size, self.workers)
        try:
            while pending or running:
                while pending and idle:
                    slot, rank = idle.pop(0), pending.popleft()
                    attempts[rank] += 1
                    self.backend.submit(slot, Task(root, stage, rank, world_size, force,
                                                   attempts[rank]))
                    running[slot] = rank
                for out in self.backend.poll(POLL_S):
                    rank = running.pop(out.slot, None)
                    if out.run is None and rank is None:  # lost between ranks
                        self.backend.replace(out.slot)
                        continue
                    if out.run is None:
                        bar.retries += 1
                        self._retry(build, stage, rank, out, attempts[rank])
                        pending.appendleft(rank)
                    else:
                        err = failure(build, stage, out.run)
                        if err:
                            raise err
                        runs.append(out.run)
                    idle.append(out.slot)
                bar.poll()
        except BaseException:
            self.backend.kill()
            raise
        finally:
            bar.close()
        return runs

    def _retry(self, build: Build, stage: str, rank: int, out: Outcome, attempts: int) -> None:
        """The worker holding ``rank`` is gone: a new one takes its slot and will run the rank
        again, unless the rank has lost --max-retries workers already."""
        limit = self.options.max_retries
        if attempts > limit:
            raise ShardFailed(f"{stage} rank {rank}: its worker died {attempts} times (last: "
                              f"{out.worker}, {out.lost}); stopped after --max-retries "
                              f"{limit}. Log: {log_path(build.root, stage, rank)}", 2)
        new = self.backend.replace(out.slot)
        self.echo(f"{stage} rank {rank}: worker {out.worker} died ({out.lost}); running it "
                  f"again on {new} (retry {attempts} of {limit})")
