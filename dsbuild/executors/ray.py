"""``--executor ray``: the backend of Ray actors, one actor per worker, shard after shard.

Each actor is a long-lived process: the stage's imports (torch, diffusers, open_clip) and its
models (``dsbuild.models.keep_loaded``: generate's pipeline, filter's encoders) load once per
worker, not once per shard. An actor that dies (killed, out of memory, its node lost) is
reported lost, and its replacement starts wherever the cluster has room; retries and errors
are the loop's (``loop.py``). The build directory must be on a filesystem every node sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict

import ray
from ray.exceptions import ActorDiedError, NodeDiedError, RayActorError, WorkerCrashedError

from dsbuild.core import quiet
from dsbuild.core.build import WORKER_ENV
from dsbuild.core.errors import DsbuildError
from dsbuild.executors.base import ExecutorOptions, RankRun, Task, run_rank
from dsbuild.executors.loop import Outcome

SYSTEM_FAILURES = (RayActorError, ActorDiedError, WorkerCrashedError, NodeDiedError)
CONNECT_TIMEOUT_S = 10  # --ray-address: its port must accept a connection this soon,
JOIN_TIMEOUT_S = 40  # and Ray must have joined the cluster this soon after


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

    def run(self, task: Task) -> RankRun:
        return run_rank(**asdict(task), worker=self.id)


def start_reaper() -> subprocess.Popen:
    """The process that ends this driver's local Ray instance with the driver (reaper.py)."""
    from ray._private import worker

    procs = worker._global_node.all_processes  # Ray's record of the processes it started
    raylet = procs["raylet"][0].process.pid
    pids = [p.process.pid for kind, ps in procs.items() if kind != "raylet" for p in ps]
    return subprocess.Popen([sys.executable, "-m", "dsbuild.executors.reaper", str(raylet),
                             *map(str, pids)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def unreachable(address: str, why: object) -> DsbuildError:
    """The one line for a cluster that does not answer (exit 2: the address is the input)."""
    return DsbuildError(f"cannot reach the Ray cluster at --ray-address {address} ({why}); "
                        "start it (`ray start --head`) or pass the address `ray status` shows "
                        "on it")


def connect(address: str) -> None:
    """Join the cluster at ``address`` (HOST:PORT of its GCS, ray://HOST:PORT, or auto), or
    fail within CONNECT_TIMEOUT_S + JOIN_TIMEOUT_S with one line naming it: Ray itself retries
    an address that does not answer, or answers but is no GCS, for minutes, printing only its
    own warnings."""
    import socket
    import threading

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    hostport = sep and port.isdigit()
    if hostport:
        try:
            socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                     timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise unreachable(address, exc.strerror or exc) from None
    failed: list[Exception] = []

    def join() -> None:  # in a thread: Ray's own retries cannot be interrupted
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except Exception as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            failed.append(exc)

    joining = threading.Thread(target=join, name="ray-connect", daemon=True)
    joining.start()
    joining.join(JOIN_TIMEOUT_S)
    answers = (f"; the port answers, but not as the GCS of a Ray {ray.__version__} cluster this "
               "machine may join (version, auth token)") if hostport else ""
    if joining.is_alive():
        raise unreachable(address, f"no cluster after {JOIN_TIMEOUT_S} s{answers}")
    if failed and isinstance(failed[0], ConnectionError):  # auto with no cluster, not a GCS
        raise unreachable(address, f"{str(failed[0]).split('. ')[0] or 'refused'}{answers}")
    if failed:
        raise failed[0]


class RayActors:
    """Workers as Ray actors: ``ray.init(address)`` (``auto`` = a running cluster), or a local
    Ray instance started here and shut down on close."""

    name = "ray"

    def __init__(self, options: ExecutorOptions):
        self.started_ray = False
        self.reaper: subprocess.Popen | None = None
        quiet.install()  # before ray.init: its token-auth notice (dsbuild.core.quiet.HIDDEN)
        if not ray.is_initialized():
            if options.ray_address:
                connect(options.ray_address)
            else:
                ray.init(address="local",  # a new instance, even beside a `ray start` one
                         include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                         num_cpus=max(options.workers, os.cpu_count() or 1))
                self.reaper = start_reaper()
            self.started_ray = True
        gpus = ray.cluster_resources().get("GPU", 0)
        gpw = options.gpus_per_worker
        self.gpus_per_worker = (1 if gpus >= 1 else 0) if gpw is None else gpw
        if self.gpus_per_worker and self.gpus_per_worker * options.workers > gpus:
            raise DsbuildError(f"--workers {options.workers} x --gpus-per-worker "
                               f"{self.gpus_per_worker} needs more GPUs than the Ray cluster "
                               f"has ({gpus:g})")
        self.actors: dict[int, tuple[str, ray.actor.ActorHandle]] = {}
        self.running: dict = {}  # object ref -> slot
        self.started = 0

    def start(self, workers: int) -> None:
        for slot in range(workers):
            if slot not in self.actors:
                self.replace(slot)

    def replace(self, slot: int) -> str:
        if slot in self.actors:
            ray.kill(self.actors.pop(slot)[1])
        wid = f"ray-{self.started}"
        self.started += 1
        actor = ShardWorker.options(name=f"dsbuild-{os.getpid()}-{wid}", num_cpus=1,
                                    num_gpus=self.gpus_per_worker).remote(wid)
        self.actors[slot] = (wid, actor)
        return wid

    def submit(self, slot: int, task: Task) -> None:
        self.running[self.actors[slot][1].run.remote(task)] = slot

    def poll(self, timeout: float) -> list[Outcome]:
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        seen = []
        for ref in ready:
            slot = self.running.pop(ref)
            wid = self.actors[slot][0]
            try:
                seen.append(Outcome(slot, wid, ray.get(ref)))
            except SYSTEM_FAILURES as exc:
                seen.append(Outcome(slot, wid, lost=type(exc).__name__))
        return seen

    def kill(self) -> None:
        for _, actor in self.actors.values():
            ray.kill(actor)
        self.actors, self.running = {}, {}

    def close(self) -> None:
        self.kill()
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
        if self.reaper:  # it ends what shutdown left (the raylet's agents)
            self.reaper.stdin.close()
            self.reaper.wait()
            self.reaper = None
