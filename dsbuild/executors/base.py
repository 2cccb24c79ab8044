"""What every executor shares: options, the world size, which ranks are left, one rank's run in
a worker (its task and outcome as data, its log), the driver's progress bar and the stage's
result; and the in-process executor. Worker executors schedule in ``loop.py``.

An executor owns ranks, retries and the driver's view; ``Build.run_stage`` (called inside the
stage's run function) still owns locks, resume and completion markers. So a rank whose worker
dies is simply run again — its partial shard resumes — and a driver killed and restarted starts
from the markers and partial files it finds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from dsbuild.core import deps, quiet, stages
from dsbuild.core.build import WORKER_ENV, Build, StageResult
from dsbuild.core.errors import DsbuildError
from dsbuild.core.progress import progress, update_postfix
from dsbuild.core.records import count_lines, shard_name

SHARDS_PER_WORKER = 4  # default world size = workers x this, so a straggler's share is small


class ShardFailed(DsbuildError):
    """A rank raised an application error (or its workers kept dying): the run stops; the exit
    status is the rank's own (2 for bad input, 1 for a stage that failed)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ExecutorOptions(BaseModel):
    """Where shards run; the ``--executor``, ``--workers``, ... options of every stage command
    and of ``dsbuild run`` are derived from these fields (dsbuild.cli.util.executor_options)."""

    executor: Literal["local", "ray"] = Field(
        "local", description="where shards run: this machine, or a Ray cluster (dsbuild[ray])")
    workers: int = Field(1, ge=1, description="worker processes (local: one GPU each, else a "
                         "share of the CPU threads) or Ray actors")
    ray_address: str | None = Field(None, description="Ray cluster to join ('auto' = the "
                                    "running one; default: start a local cluster)")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per worker (default: 1 "
                                          "where there are GPUs, else 0)")
    shards: int | None = Field(None, ge=1, description="number of shards (world size; default: "
                               "4 per worker, or the stage's earlier sharding)")
    max_retries: int = Field(3, ge=0, description="times a rank is run again when its worker "
                             "dies (never for an application error)")
    threads_per_worker: int | None = None  # CPU workers: default cpu_count // workers

    def model_post_init(self, _context) -> None:
        if self.ray_address and self.executor != "ray":
            raise DsbuildError("--ray-address is for --executor ray")

    @property
    def distributed(self) -> bool:
        """Whether ranks run outside this process (worker processes or a Ray cluster)."""
        return self.executor != "local" or self.workers > 1


@dataclass
class Task:
    """One rank for a worker to run (plain data, so it crosses processes): :func:`run_rank`'s
    arguments but the worker's id, which the worker adds."""

    root: str
    stage: str
    rank: int
    world_size: int
    force: bool
    attempt: int


@dataclass
class RankRun:
    """What one rank's run in a worker came to (plain data, so it crosses processes)."""

    rank: int
    worker: str
    host: str = ""
    pid: int = 0
    skipped: bool = False
    records: int = 0
    seconds: float = 0.0
    error: dict | None = None  # {type, message, exit_code} of an application error
    signature: str = ""  # the stage signature the worker computed (must match the driver's)
    stats: dict = field(default_factory=dict)


def log_path(root: str | Path, stage: str, rank: int) -> Path:
    """BUILD/logs/<stage>/rNNNNN.log: a rank's stdout and stderr, every attempt appended."""
    return Path(root) / "logs" / stage / f"r{rank:05d}.log"


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors too, so C libraries' output and
    progress bars land there) to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab", buffering=0) as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def run_rank(root: str, stage: str, rank: int, world_size: int, *, force: bool = False,
             worker: str = "main", attempt: int = 1) -> RankRun:
    """Run one rank of ``stage`` here (in a worker), its output in the rank's log. An
    exception the stage raises comes back as ``error`` data: it is the stage's (application)
    error, not the worker's, and must stop the run rather than be retried."""
    os.environ[WORKER_ENV] = worker
    quiet.install()  # a worker's log gets no library noise and no bars (it is no terminal)
    out = RankRun(rank, worker, socket.gethostname(), os.getpid())
    log = log_path(root, stage, rank)
    t0 = time.perf_counter()
    with output_to(log):
        print(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {stage} rank {rank}/"
              f"{world_size} attempt {attempt} on worker {worker} (PID {out.pid}, {out.host})",
              flush=True)
        try:
            build = Build.open(root)
            out.signature = build.signature(stage)
            res = stages.get(stage).load_run()(build, rank, world_size, force=force)
            out.skipped, out.records, out.stats = res.skipped, res.records, res.stats
            print(f"--- done: {'skipped (already done)' if res.skipped else 'written'}, "
                  f"{res.records} records", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the run
            traceback.print_exc()
            out.error = {"type": type(exc).__name__, "message": str(exc),
                         "exit_code": getattr(exc, "exit_code", 1)
                         if isinstance(exc, DsbuildError) else 1}
    out.seconds = round(time.perf_counter() - t0, 3)
    return out


def failure(build: Build, stage: str, run: RankRun) -> ShardFailed | None:
    """The error that stops a run when a rank raised (which rank, where, why, and its log), or
    when its worker signed the stage differently (another dsbuild or recipe on that node:
    its marker would not count here); None when the rank is fine."""
    if not run.error and run.signature and run.signature != build.signature(stage):
        return ShardFailed(
            f"{stage} rank {run.rank} ran on worker {run.worker} ({run.host}) under signature "
            f"{run.signature}, but this driver computes {build.signature(stage)}: that worker "
            "runs another dsbuild version or sees other files. Install the same dsbuild on "
            "every node and put the build on a filesystem they all share", 2)
    if not run.error:
        return None
    e = run.error
    return ShardFailed(f"{stage} rank {run.rank} failed on worker {run.worker} ({run.host}, PID "
                       f"{run.pid}): {e.get('type')}: {e.get('message')}\n"
                       f"  log: {log_path(build.root, stage, run.rank)}",
                       int(e.get("exit_code", 1)))


def expected_records(build: Build, stage: str, world_size: int) -> list[int] | None:
    """The records each rank of ``stage`` is to write, from the stage's declared ``expected``
    (None: the stage declares none, or its inputs cannot say yet)."""
    st = stages.get(stage)
    if st.expected is None:
        return None
    try:
        sizes = deps.load_target(st.expected, what=f"stage {stage}")(build, world_size)
    except DsbuildError:  # e.g. no triples yet: the rank itself will say so
        return None
    return None if sizes is None else [int(n) for n in sizes]


class DriverProgress:
    """One bar in the driver over every worker, in the stage's own unit (as its one-worker
    bar): records written so far (committed shards from their markers, running ones from
    their partial shards' line counts), rate and ETA.

    The total is the sum of the shards' expected records (the stage's ``expected``), set once
    before the first shard starts; a done shard counts as its expected size, so the bar ends
    at 100 %. A stage that declares no ``expected`` gets an estimate from the shards done so
    far, which only ever grows (and so does the count)."""

    def __init__(self, build: Build, stage: str, world_size: int, workers: int):
        self.build, self.stage, self.world_size = build, stage, world_size
        self.st = stages.get(stage)
        self.out_dir = build.output_dir(stage)
        self.expected = expected_records(build, stage, world_size)
        total = sum(self.expected) if self.expected is not None else None
        self.bar = progress(total=total, desc=f"{stage} x{workers} workers", unit=self.st.unit)
        self.retries = 0
        self.poll()

    def poll(self) -> None:
        marks = {r: m for r, m in self.build.markers(self.stage).items() if r < self.world_size}
        counts = {r: m.get("records", 0) for r, m in marks.items()}
        if self.st.records:
            for rank in set(range(self.world_size)) - set(marks):
                counts[rank] = count_lines(self.out_dir / (shard_name(rank) + ".partial"))
        if self.expected is not None:
            n = sum(self.expected[r] if r in marks else min(c, self.expected[r])
                    for r, c in counts.items())
        else:
            n = sum(counts.values())
            done = sum(counts[r] for r in marks)
            guess = round(done / len(marks) * self.world_size) if marks else 0
            if len(marks) >= self.world_size:
                guess = n
            if marks or self.bar.total is not None:
                self.bar.total = max(self.bar.total or 0, guess, n)
        self.bar.n = max(self.bar.n, n)
        update_postfix(self.bar, shards=f"{len(marks)}/{self.world_size}",
                       **({"retries": self.retries} if self.retries else {}))
        self.bar.refresh()

    def close(self) -> None:
        self.poll()
        self.bar.close()


class Executor:
    """Runs a stage's ranks. This base class runs them one after another in this process
    (``--executor local``, one worker), and it runs the unsharded stages of every executor."""

    name = "local"
    in_process = True  # ranks run here and return the stage's own results

    def __init__(self, options: ExecutorOptions | None = None,
                 echo: Callable[[str], None] = print):
        self.options = options or ExecutorOptions()
        self.echo = echo

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release workers (processes, actors, the cluster connection)."""

    @property
    def workers(self) -> int:
        return self.options.workers

    def world_size(self, build: Build, stage: str, shards: int | None = None) -> int:
        """--shards, else the world size the stage already ran with under its settings (a
        resumed stage keeps its sharding), else several shards per worker (one in process)."""
        shards = shards or self.options.shards
        if shards:
            return shards
        prev = build.stage_world_size(stage)
        if prev:
            return prev
        return SHARDS_PER_WORKER * self.workers if self.options.distributed else 1

    def run(self, build: Build, stage: str, *, shards: int | None = None,
            force: bool = False) -> StageResult:
        """Run every rank of ``stage`` that is not done; return the stage's result."""
        st = stages.get(stage)
        if not st.sharded:
            return st.load_run()(build, 0, 1, force=force)
        ws = self.world_size(build, stage, shards)
        for up in build.required(stage):  # a clear error before any worker starts
            build.require_complete(up)
        prev = build.stage_world_size(stage)
        if prev is not None and prev != ws and not force:
            raise DsbuildError(
                f"stage '{stage}' already ran with {prev} shards for these settings; use "
                f"--shards {prev}, or --force to start the stage over")
        if force:  # cleared once here, not by each rank (they would remove each other's)
            import shutil

            shutil.rmtree(build.marker_dir(stage), ignore_errors=True)
        done = build.markers(stage)
        todo = [r for r in range(ws) if r not in done]
        if not todo:  # every rank done: the run function skips and refreshes its report
            res = st.load_run()(build, 0, ws)
            return res if ws == 1 else self._result(build, stage, ws, [])
        runs = self.run_ranks(build, stage, ws, todo, force)
        if ws == 1 and self.in_process:
            return runs[0]  # the stage's own result
        return self._result(build, stage, ws, runs)

    def run_ranks(self, build: Build, stage: str, world_size: int, ranks: list[int],
                  force: bool) -> list:
        """Run ``ranks`` and return their results; raise ShardFailed on an application error."""
        fn = stages.get(stage).load_run()
        os.environ.setdefault(WORKER_ENV, "main")
        return [fn(build, r, world_size, force=force) for r in ranks]

    def _result(self, build: Build, stage: str, world_size: int, runs: list) -> StageResult:
        """The stage's result over every rank, from the markers (what is on disk)."""
        marks = build.markers(stage)
        records = sum(m.get("records", 0) for m in marks.values())
        ran = [r for r in runs if not r.skipped]
        workers = len({getattr(r, "worker", "main") for r in ran}) or 0
        where = f" on {workers} {self.name} worker{'s' if workers != 1 else ''}" if ran else ""
        summary = (f"{records} records in {world_size} shards ({len(ran)} run now{where}, "
                   f"{world_size - len(ran)} already done)")
        return StageResult(stage, 0, world_size, skipped=not ran, records=records,
                           stats={"summary": summary, "ranks_run": sorted(r.rank for r in ran)})

