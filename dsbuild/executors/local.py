"""``--executor local --workers N``: N worker processes on this machine, shard after shard.

Each worker is ``python -m dsbuild.executors.worker``: it reads ranks on stdin and answers one
JSON line per rank, and stays up between ranks (and stages). Worker i sees only its own GPUs
(``CUDA_VISIBLE_DEVICES``); without GPUs each gets an equal share of the CPU threads. A worker
that dies mid-shard (killed, out of memory) is replaced and its rank run again, where its
partial shard resumes; an error the stage raises stops the run.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections import deque
from dataclasses import asdict

from dsbuild.core.build import WORKER_ENV, Build
from dsbuild.core.errors import DsbuildError
from dsbuild.executors.base import DriverProgress, Executor, RankRun, failure, log_path

POLL_S = 0.5


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def worker_env(index: int, workers: int, gpus: list[str], gpus_per_worker: float | None,
               worker_id: str, threads: int | None = None) -> dict[str, str]:
    """Environment of worker ``index``: its GPUs, or its share of the CPU threads."""
    env = dict(os.environ, DSBUILD_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    env[WORKER_ENV] = worker_id
    per = int(gpus_per_worker) if gpus_per_worker is not None else (1 if gpus else 0)
    if per > 0:
        if len(gpus) < per * workers:
            raise DsbuildError(f"--workers {workers} x --gpus-per-worker {per} needs "
                               f"{per * workers} GPUs; this machine shows {len(gpus)}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[index * per:(index + 1) * per])
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU: no worker touches a GPU
        n = str(threads or max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = n
    return env


class _Worker:
    """One worker process and the thread that reads its answers into the driver's queue."""

    def __init__(self, slot: int, worker_id: str, env: dict[str, str], inbox: queue.Queue):
        self.slot, self.id = slot, worker_id
        self.proc = subprocess.Popen([sys.executable, "-m", "dsbuild.executors.worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        self.rank: int | None = None
        self.attempt = 1
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox: queue.Queue) -> None:
        for line in self.proc.stdout:
            inbox.put((self, line))
        self.proc.wait()
        inbox.put((self, None))  # the process ended

    def send(self, task: dict) -> None:
        self.rank, self.attempt = task["rank"], task["attempt"]
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LocalWorkers(Executor):
    """N worker processes on this machine; ranks are handed to whichever is free."""

    name = "local"

    def __init__(self, options, echo=print):
        super().__init__(options, echo)
        self.gpus = visible_gpus()
        self.inbox: queue.Queue = queue.Queue()
        self.pool: list[_Worker] = []
        self.started = 0

    def _spawn(self, slot: int) -> _Worker:
        wid = f"local-{self.started}"
        self.started += 1
        env = worker_env(slot, self.workers, self.gpus, self.options.gpus_per_worker, wid,
                         self.options.threads_per_worker)
        return _Worker(slot, wid, env, self.inbox)

    def close(self) -> None:
        for w in self.pool:
            w.stop()
        self.pool = []

    def run_ranks(self, build: Build, stage: str, world_size: int, ranks: list[int],
                  force: bool) -> list[RankRun]:
        if not self.pool:
            self.pool = [self._spawn(i) for i in range(self.workers)]
        pending = deque(ranks)
        attempts = dict.fromkeys(ranks, 0)
        idle = [w for w in self.pool if w.proc.poll() is None]
        busy: set[_Worker] = set()
        runs: list[RankRun] = []
        bar = DriverProgress(build, stage, world_size, self.workers)
        try:
            while pending or busy:
                while pending and idle:
                    w, rank = idle.pop(0), pending.popleft()
                    attempts[rank] += 1
                    w.send({"root": str(build.root), "stage": stage, "rank": rank,
                            "world_size": world_size, "force": force,
                            "attempt": attempts[rank]})
                    busy.add(w)
                try:
                    w, line = self.inbox.get(timeout=POLL_S)
                except queue.Empty:
                    bar.poll()
                    continue
                if w not in self.pool:
                    continue  # the end of a worker already replaced
                if line is None:  # the process died
                    self.pool.remove(w)
                    busy.discard(w)
                    if w in idle:
                        idle.remove(w)
                    new = self._spawn(w.slot)
                    self.pool.append(new)
                    idle.append(new)
                    if w.rank is not None:
                        bar.retries += 1
                        self._lost(build, stage, w, attempts, pending)
                    continue
                run = RankRun(**json.loads(line))
                w.rank = None
                busy.discard(w)
                idle.append(w)
                err = failure(build, stage, run)
                if err:
                    raise err
                runs.append(run)
                bar.poll()
        except BaseException:
            for w in self.pool:  # stop the others: their ranks resume on the next run
                w.stop(kill=True)
            self.pool = []
            raise
        finally:
            bar.close()
        return runs

    def _lost(self, build: Build, stage: str, w: _Worker, attempts: dict, pending: deque):
        """A worker died holding a rank: run the rank again, up to --max-retries times."""
        rank, code = w.rank, w.proc.returncode
        limit = self.options.max_retries
        if attempts[rank] > limit:
            raise DsbuildError(f"{stage} rank {rank}: its worker died {attempts[rank]} times "
                               f"(last: {w.id}, exit status {code}); stopped after "
                               f"--max-retries {limit}. Log: {log_path(build.root, stage, rank)}")
        self.echo(f"{stage} rank {rank}: worker {w.id} died (exit status {code}); running it "
                  f"again on a new worker (retry {attempts[rank]} of {limit})")
        pending.appendleft(rank)


def encode(run: RankRun) -> str:
    """One answer line from a worker."""
    return json.dumps(asdict(run), default=str)
