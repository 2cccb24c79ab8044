"""``--executor local --workers N``: the backend of N worker processes on this machine.

Each worker is ``python -m dsbuild.executors.worker``: it reads tasks on stdin and answers one
JSON line per rank, and stays up between ranks (and stages). Worker i sees only its own GPUs
(``CUDA_VISIBLE_DEVICES``); without GPUs each gets an equal share of the CPU threads. A worker
whose process ends is reported lost; retries and errors are the loop's (``loop.py``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict

from dsbuild.core.build import WORKER_ENV
from dsbuild.core.errors import DsbuildError
from dsbuild.executors.base import ExecutorOptions, RankRun, Task
from dsbuild.executors.loop import Outcome


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
    """One worker process and the thread that reads its answers into the backend's inbox."""

    def __init__(self, slot: int, worker_id: str, env: dict[str, str], inbox: queue.Queue):
        self.slot, self.id = slot, worker_id
        self.proc = subprocess.Popen([sys.executable, "-m", "dsbuild.executors.worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox: queue.Queue) -> None:
        for line in self.proc.stdout:
            inbox.put((self, line))
        self.proc.wait()
        inbox.put((self, None))  # the process ended

    def send(self, task: Task) -> None:
        try:
            self.proc.stdin.write(json.dumps(asdict(task)) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the process is gone: its reader reports it, and the task is run again

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


class LocalProcesses:
    """Worker processes on this machine, in slots, each with its GPUs or its CPU threads."""

    name = "local"

    def __init__(self, options: ExecutorOptions):
        self.options = options
        self.gpus = visible_gpus()
        self.inbox: queue.Queue = queue.Queue()
        self.pool: dict[int, _Worker] = {}
        self.started = 0

    def start(self, workers: int) -> None:
        for slot in range(workers):
            if slot not in self.pool or self.pool[slot].proc.poll() is not None:
                self.replace(slot)

    def replace(self, slot: int) -> str:
        wid = f"local-{self.started}"
        self.started += 1
        env = worker_env(slot, self.options.workers, self.gpus, self.options.gpus_per_worker,
                         wid, self.options.threads_per_worker)
        self.pool[slot] = _Worker(slot, wid, env, self.inbox)
        return wid

    def submit(self, slot: int, task: Task) -> None:
        self.pool[slot].send(task)

    def poll(self, timeout: float) -> list[Outcome]:
        seen = []
        try:
            item = self.inbox.get(timeout=timeout)
            while True:
                w, line = item
                if self.pool.get(w.slot) is w:  # not the end of a worker already replaced
                    seen.append(Outcome(w.slot, w.id, lost=f"exit status {w.proc.returncode}")
                                if line is None else
                                Outcome(w.slot, w.id, RankRun(**json.loads(line))))
                item = self.inbox.get_nowait()
        except queue.Empty:
            return seen

    def kill(self) -> None:
        for w in self.pool.values():
            w.stop(kill=True)
        self.pool = {}

    def close(self) -> None:
        for w in self.pool.values():
            w.stop()
        self.pool = {}


def encode(run: RankRun) -> str:
    """One answer line from a worker."""
    return json.dumps(asdict(run), default=str)
