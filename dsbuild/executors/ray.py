"""``--executor ray``: shards as tasks on Ray actors, one actor per worker, shard after shard.

Each actor is a long-lived process: the stage's imports (torch, diffusers, open_clip) and its
models (``dsbuild.models.keep_loaded``: generate's pipeline, filter's encoders) load once per
worker, not once per shard. A worker
that dies (killed, out of memory, its node lost) is a system failure: a new actor is started
wherever the cluster has room and the rank runs again there, resuming its partial shard, up to
``--max-retries`` times. An error the stage raises is an application error: the run stops at
once and prints the rank. The build directory must be on a filesystem every node sees.
"""

from __future__ import annotations

import os
from collections import deque

import ray
from ray.exceptions import ActorDiedError, NodeDiedError, RayActorError, WorkerCrashedError

from dsbuild.core.build import WORKER_ENV, Build
from dsbuild.core.errors import DsbuildError
from dsbuild.executors.base import DriverProgress, Executor, RankRun, failure, log_path, run_rank

SYSTEM_FAILURES = (RayActorError, ActorDiedError, WorkerCrashedError, NodeDiedError)
POLL_S = 0.5


@ray.remote(max_restarts=0, max_concurrency=2)  # 2: info() answers while a rank runs
class ShardWorker:
    """One worker: runs ranks of any stage, one at a time, in this process."""

    def __init__(self, worker_id: str):
        self.id = worker_id
        os.environ[WORKER_ENV] = worker_id
        os.environ["DSBUILD_NO_PROGRESS"] = "1"  # one bar, in the driver

    def info(self) -> dict:
        import socket

        return {"worker": self.id, "pid": os.getpid(), "host": socket.gethostname(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def run(self, root: str, stage: str, rank: int, world_size: int, force: bool,
            attempt: int) -> RankRun:
        return run_rank(root, stage, rank, world_size, force=force, worker=self.id,
                        attempt=attempt)


class RayExecutor(Executor):
    """Ranks on Ray actors: ``ray.init(address)`` (``auto`` = a running cluster), or a local
    cluster started here and shut down after."""

    name = "ray"

    def __init__(self, options, echo=print):
        super().__init__(options, echo)
        self.started_ray = False
        if not ray.is_initialized():
            kw = {"address": options.address} if options.address else {
                "num_cpus": max(options.workers, os.cpu_count() or 1)}
            ray.init(include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING", **kw)
            self.started_ray = True
        gpus = ray.cluster_resources().get("GPU", 0)
        gpw = options.gpus_per_worker
        self.gpus_per_worker = (1 if gpus >= 1 else 0) if gpw is None else gpw
        if self.gpus_per_worker and self.gpus_per_worker * options.workers > gpus:
            raise DsbuildError(f"--workers {options.workers} x --gpus-per-worker "
                               f"{self.gpus_per_worker} needs more GPUs than the Ray cluster "
                               f"has ({gpus:g})")
        self.actors: dict[int, tuple[str, ray.actor.ActorHandle]] = {}
        self.started = 0

    def _spawn(self, slot: int) -> None:
        wid = f"ray-{self.started}"
        self.started += 1
        actor = ShardWorker.options(name=f"dsbuild-{os.getpid()}-{wid}", num_cpus=1,
                                    num_gpus=self.gpus_per_worker).remote(wid)
        self.actors[slot] = (wid, actor)

    def worker_info(self) -> list[dict]:
        """pid/host/gpus of each live worker (tests kill one through this)."""
        return ray.get([a.info.remote() for _, a in self.actors.values()])

    def close(self) -> None:
        for _, actor in self.actors.values():
            ray.kill(actor)
        self.actors = {}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def run_ranks(self, build: Build, stage: str, world_size: int, ranks: list[int],
                  force: bool) -> list[RankRun]:
        for slot in range(self.workers):
            if slot not in self.actors:
                self._spawn(slot)
        root = str(build.root.resolve())
        pending = deque(ranks)
        attempts = dict.fromkeys(ranks, 0)
        idle = list(self.actors)
        running: dict = {}  # object ref -> (slot, rank)
        runs: list[RankRun] = []
        bar = DriverProgress(build, stage, world_size, self.workers)
        try:
            while pending or running:
                while pending and idle:
                    slot, rank = idle.pop(0), pending.popleft()
                    attempts[rank] += 1
                    ref = self.actors[slot][1].run.remote(root, stage, rank, world_size, force,
                                                          attempts[rank])
                    running[ref] = (slot, rank)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    slot, rank = running.pop(ref)
                    try:
                        run = ray.get(ref)
                    except SYSTEM_FAILURES as exc:
                        bar.retries += 1
                        self._lost(build, stage, slot, rank, exc, attempts)
                        pending.appendleft(rank)
                        idle.append(slot)
                        continue
                    idle.append(slot)
                    err = failure(build, stage, run)
                    if err:
                        raise err
                    runs.append(run)
                bar.poll()
        except BaseException:
            for _, actor in self.actors.values():  # their ranks resume on the next run
                ray.kill(actor)
            self.actors = {}
            raise
        finally:
            bar.close()
        return runs

    def _lost(self, build: Build, stage: str, slot: int, rank: int, exc: Exception,
              attempts: dict) -> None:
        """A worker died holding a rank: a new actor takes the slot and the rank runs again."""
        wid, actor = self.actors.pop(slot)
        ray.kill(actor)
        limit = self.options.max_retries
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if attempts[rank] > limit:
            raise DsbuildError(f"{stage} rank {rank}: its worker died {attempts[rank]} times "
                               f"(last: {wid}: {why}); stopped after --max-retries {limit}. "
                               f"Log: {log_path(build.root, stage, rank)}")
        self._spawn(slot)
        self.echo(f"{stage} rank {rank}: worker {wid} died ({type(exc).__name__}); running it "
                  f"again on {self.actors[slot][0]} (retry {attempts[rank]} of {limit})")
