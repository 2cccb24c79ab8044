"""Executors: the offline recipe on a real local Ray cluster (4 shards, 2 workers, one worker
killed mid-generate) gives the records of an in-process run; local worker processes; an
application error stops the run with its rank; a missing ray gives the pip line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsbuild.cli.run import run_pipeline, run_settings
from dsbuild.core.build import Build
from dsbuild.core.config import default_recipe_path, load_recipe
from dsbuild.core.pause import PAUSE_ENV
from dsbuild.core.records import count_lines
from dsbuild.executors import ExecutorOptions, make_executor

# the offline demo with --per-agent 1, trimmed to one sample per triple and two steps: every stage
# still runs on every agent of the recipe
SETTINGS = [*run_settings(offline=True, per_agent=1), "generate.per_triple=1",
            "generate.steps=2"]
ENV = dict(os.environ, DSBUILD_NO_PROGRESS="1", HF_HUB_OFFLINE="1")


def new_build(root: Path, *sets: str) -> Build:
    path = default_recipe_path()
    return Build.init(root, load_recipe(path), recipe_path=str(path), overrides=[*SETTINGS, *sets])


def ids(build: Build, stage: str, key: str = "id") -> list[str]:
    return [r[key] for r in build.records(stage)]


@pytest.fixture(scope="module")
def local_build(tmp_path_factory, one_torch_thread):
    """The reference: every stage in this process, one shard each."""
    b = new_build(tmp_path_factory.mktemp("local") / "A")
    run_pipeline(None, b.root, echo=lambda s: None)
    return Build.open(b.root)


@pytest.fixture(scope="module")
def pause_file(tmp_path_factory) -> Path:
    """Where a writer paused by DSBUILD_PAUSE_AT says who it is (dsbuild/core/pause.py)."""
    return tmp_path_factory.mktemp("pause") / "paused.json"


# the Ray test's generate rank 0 stops after its 3rd of 7 records, until killed
RAY_PAUSE = "pairs/r00000.jsonl:3"


@pytest.fixture(scope="module")
def ray_cluster(pause_file):
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {PAUSE_ENV: f"{RAY_PAUSE}:{pause_file}"}})
    yield ray
    ray.shutdown()


def actor_pids(ray) -> dict[int, str]:
    """PID -> worker id of this job's dsbuild workers, asked through Ray."""
    out = {}
    for name in ray.util.list_named_actors():
        if name.startswith("dsbuild-"):
            info = ray.get(ray.get_actor(name).info.remote())
            out[info["pid"]] = info["worker"]
    return out


def paused_writer(pause_file: Path, run: threading.Thread) -> dict:
    """The writer paused at its known record (pid, shard, records): waits for the file it
    creates there (the deadline only bounds a run that never gets there)."""
    deadline = time.monotonic() + 240
    while not pause_file.exists():
        assert run.is_alive(), "the run ended before a writer paused"
        assert time.monotonic() < deadline, "no writer reached the pause point"
        time.sleep(0.05)
    return json.loads(pause_file.read_text())


@pytest.mark.server
def test_ray_4_shards_2_workers_one_killed_mid_generate_equals_local(
        local_build, ray_cluster, pause_file, tmp_path):
    ray = ray_cluster
    b = new_build(tmp_path / "B")
    said: list[str] = []
    errors: list[BaseException] = []

    def run():
        try:
            run_pipeline(None, b.root, echo=said.append,
                         executor=ExecutorOptions(executor="ray", workers=2, shards=4))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    paused = paused_writer(pause_file, t)
    assert paused["records"] == 3 and paused["shard"].endswith("r00000.jsonl"), paused
    workers = actor_pids(ray)
    assert paused["pid"] in workers, (paused, workers)  # the rank is written in a Ray actor
    os.kill(paused["pid"], signal.SIGKILL)
    killed = workers[paused["pid"]]
    t.join(timeout=240)
    assert not t.is_alive() and not errors, (errors, said)
    assert any(f"worker {killed} died" in s and "retry 1 of 3" in s for s in said), said

    b = Build.open(b.root)
    for stage, key in (("captions", "id"), ("generate", "id"), ("filter", "pair_id")):
        got, want = ids(b, stage, key), ids(local_build, stage, key)
        assert len(got) == len(set(got)), f"{stage}: duplicated records"  # 0 duplicated
        assert sorted(got) == sorted(want), stage  # 0 lost, same ids
        assert b.stage_world_size(stage) == 4 and local_build.stage_world_size(stage) == 1
    for a in b.records("generate"):  # same pixels (float tolerance: 8-bit PNGs within 2)
        for side in ("input", "output"):
            x = np.asarray(Image.open(b.root / a["images"][side]), dtype=int)
            y = np.asarray(Image.open(local_build.root / a["images"][side]), dtype=int)
            assert np.abs(x - y).max() <= 2, a["images"][side]
    assert export_rows(b.root) == export_rows(local_build.root)

    st = b.status()["stages"]["generate"]
    assert sum(st["workers"].values()) == 4 and all(w.startswith("ray-") for w in st["workers"])
    logs = sorted((b.root / "logs" / "generate").glob("r*.log"))
    assert len(logs) == 4
    assert "attempt 2" in logs[0].read_text()  # the killed rank ran again, and resumed
    assert count_lines(b.root / "pairs" / "r00000.jsonl") == 7


def export_rows(root: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    rows = {split: sum(pq.ParquetFile(f).metadata.num_rows
                       for f in (root / "export" / "data").glob(f"{split}-*.parquet"))
            for split in ("train", "test")}
    assert rows["train"] > 0
    return rows


# captions on the openai backend with no key: every rank raises at once, with no torch import
NO_KEY = ("captions.backend=openai", "captions.api_key_env=DSBUILD_TEST_NO_SUCH_KEY")


@pytest.mark.server
def test_ray_application_error_stops_with_its_rank(ray_cluster, tmp_path):
    from dsbuild.executors import ShardFailed

    b = new_build(tmp_path / "C", *NO_KEY)
    with make_executor(ExecutorOptions(executor="ray", workers=2, shards=2)) as ex, \
            pytest.raises(ShardFailed, match=r"captions rank \d failed on worker ray-\d") as e:
        ex.run(b, "captions")
    assert e.value.exit_code == 2 and "DSBUILD_TEST_NO_SUCH_KEY" in str(e.value)
    assert "logs/captions/r0000" in str(e.value)
    assert not b.markers("captions")


def copy_captions(src: Build, dst: Path, *sets: str) -> Build:
    """A new build that reuses ``src``'s captions (same captions settings, so same signature)."""
    b = new_build(dst, *sets)
    for part in ("triples", ".done/captions"):
        shutil.copytree(src.root / part, b.root / part)
    assert b.is_complete("captions")
    return b


def test_local_workers_one_killed_mid_generate_lose_nothing(local_build, tmp_path,
                                                            monkeypatch):
    b = copy_captions(local_build, tmp_path / "L")
    pause_file = tmp_path / "paused.json"  # rank 3 stops after its 2nd of 5, until killed
    monkeypatch.setenv(PAUSE_ENV, f"pairs/r00003.jsonl:2:{pause_file}")
    said: list[str] = []
    errors: list[BaseException] = []

    def run():
        try:
            with make_executor(ExecutorOptions(executor="local", workers=2, shards=4),
                               echo=said.append) as ex:
                ex.run(b, "generate")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    paused = paused_writer(pause_file, t)
    assert paused["pid"] != os.getpid() and paused["records"] == 2, paused
    os.kill(paused["pid"], signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive() and not errors, (errors, said)
    assert any("died (exit status -9)" in s and "retry 1 of 3" in s for s in said), said
    got, want = ids(b, "generate"), ids(local_build, "generate")
    assert len(got) == len(set(got)) and sorted(got) == sorted(want)
    assert count_lines(b.root / "pairs" / "r00003.jsonl") == 5  # 2 resumed, 3 written after
    workers = b.status()["stages"]["generate"]["workers"]
    assert sum(workers.values()) == 4 and all(w.startswith("local-") for w in workers)


def test_local_workers_cli_error_names_the_rank_and_exit_status(tmp_path):
    b = new_build(tmp_path / "D", *NO_KEY)
    r = subprocess.run([sys.executable, "-m", "dsbuild", "captions", str(b.root), "--workers",
                        "2"], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert re.search(r"captions rank \d failed on worker local-\d", r.stderr), r.stderr
    assert "DSBUILD_TEST_NO_SUCH_KEY" in r.stderr and "logs/captions/r0000" in r.stderr
    assert not b.markers("captions")


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_an_unreachable_ray_address_is_one_line_and_exit_2_soon(tmp_path, address):
    pytest.importorskip("ray")
    b = new_build(tmp_path / "R")
    r = subprocess.run([sys.executable, "-m", "dsbuild", "captions", str(b.root), "--executor",
                        "ray", "--ray-address", address], env=ENV, capture_output=True, text=True,
                       timeout=60)  # Ray alone retried 127.0.0.1:1 for minutes
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f"error: cannot reach the Ray cluster at --ray-address {address} (Connection refused); "
        "start it (`ray start --head`) or pass the address `ray status` shows on it"]
    assert not b.markers("captions")


@pytest.mark.server
def test_a_killed_drivers_ray_processes_end_with_it(tmp_path):
    """SIGKILL a driver that started its own Ray instance, mid-rank: its raylet's processes
    (workers, DashboardAgent, RuntimeEnvAgent) end with it (they lived 60-120 s before)."""
    pytest.importorskip("ray")
    from dsbuild.executors.reaper import children, start_time

    b = new_build(tmp_path / "K")
    pause_file = tmp_path / "paused.json"
    env = dict(ENV, **{PAUSE_ENV: f"triples/r00000.jsonl:1:{pause_file}"})
    driver = subprocess.Popen([sys.executable, "-m", "dsbuild", "captions", str(b.root),
                               "--executor", "ray", "--workers", "2", "--shards", "2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 240
        while not pause_file.exists():
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "no writer reached the pause point"
            time.sleep(0.05)
        actor = json.loads(pause_file.read_text())["pid"]
        ray_procs = {pid: start_time(pid) for pid in children(driver.pid)}
        raylet = next(p for p in ray_procs if actor in children(p))
        ray_procs |= {pid: start_time(pid) for pid in children(raylet)}
        assert len(children(raylet)) >= 3  # the actors, the two agents
    finally:
        driver.kill()
    driver.wait()
    deadline = time.monotonic() + 30
    while left := [p for p, t in ray_procs.items() if t is not None and start_time(p) == t]:
        assert time.monotonic() < deadline, f"still running 30 s after the driver: {left}"
        time.sleep(0.1)


def test_executor_options_are_checked(tmp_path):
    from click.testing import CliRunner

    from dsbuild.cli import cli

    b = new_build(tmp_path / "E")
    r = CliRunner().invoke(cli, ["captions", str(b.root), "--workers", "2", "--rank", "1"])
    assert r.exit_code == 2 and "--rank runs one shard here" in r.output
    r = CliRunner().invoke(cli, ["generate", str(b.root), "--ray-address", "auto"])
    assert r.exit_code != 0 and "--ray-address is for --executor ray" in str(r.exception)


def test_missing_ray_gives_the_pip_line(monkeypatch):
    from dsbuild.core.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    monkeypatch.delitem(sys.modules, "dsbuild.executors.ray", raising=False)
    with pytest.raises(MissingDependency, match=r"pip install 'dsbuild\[ray\]'"):
        make_executor(ExecutorOptions(executor="ray", workers=2))


class LosingWorkers:
    """A backend whose every worker is lost on the rank it is given."""

    name = "fake"

    def __init__(self):
        self.ids: dict[int, str] = {}
        self.new, self.given, self.killed = 0, [], False

    def start(self, workers):
        for slot in range(workers):
            self.replace(slot)

    def replace(self, slot):
        self.ids[slot] = f"fake-{self.new}"
        self.new += 1
        return self.ids[slot]

    def submit(self, slot, task):
        self.given.append(slot)

    def poll(self, timeout):
        from dsbuild.executors.loop import Outcome

        lost = [Outcome(s, self.ids[s], lost="exit status -9") for s in self.given]
        self.given = []
        return lost

    def kill(self):
        self.killed = True

    def close(self):
        pass


def test_a_rank_whose_workers_keep_dying_stops_after_max_retries(tmp_path):
    from dsbuild.executors import ShardFailed, WorkerPool

    b = new_build(tmp_path / "F")
    backend, said = LosingWorkers(), []
    opts = ExecutorOptions(executor="local", workers=2, shards=2, max_retries=2)
    with WorkerPool(backend, opts, echo=said.append) as ex, \
            pytest.raises(ShardFailed, match=r"captions rank \d: its worker died 3 times") as e:
        ex.run(b, "captions")
    assert e.value.exit_code == 2 and "logs/captions/r0000" in str(e.value)
    assert any(re.search(r"worker fake-\d died \(exit status -9\); running it again on "
                         r"fake-\d \(retry 2 of 2\)", s) for s in said), said
    assert backend.killed and not b.markers("captions")
