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
from dsbuild.executors import ExecutorOptions, make_executor

# the offline demo with --limit 1, trimmed to one sample per triple and two steps: every stage
# still runs on every agent of the recipe
SETTINGS = [*run_settings(offline=True, limit=1), "generate.limit=1", "generate.steps=2"]
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
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="WARNING")
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


def writer_of_a_running_rank(root: Path) -> int | None:
    """PID holding the lock of a generate rank that has written a record but is not done."""
    for part in sorted((root / "pairs").glob("r*.jsonl.partial")):
        if part.stat().st_size and not part.with_suffix("").exists():
            lock = root / ".locks" / f"generate.{part.name.split('.')[0]}.lock"
            try:
                return json.loads(lock.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                return None
    return None


@pytest.mark.server
def test_ray_4_shards_2_workers_one_killed_mid_generate_equals_local(
        local_build, ray_cluster, tmp_path):
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
    killed = None
    deadline = time.monotonic() + 150
    while killed is None and t.is_alive() and time.monotonic() < deadline:
        pid = writer_of_a_running_rank(b.root)
        if pid is not None:
            workers = actor_pids(ray)
            assert pid in workers, (pid, workers)  # the rank is written inside a Ray actor
            os.kill(pid, signal.SIGKILL)
            killed = workers[pid]
        time.sleep(0.05)
    t.join(timeout=240)
    assert not t.is_alive() and not errors, (errors, said)
    assert killed, "no generate rank was caught mid-shard"
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
    assert any("attempt 2" in f.read_text() for f in logs)  # the killed rank ran again


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


def test_local_workers_one_killed_mid_generate_lose_nothing(local_build, tmp_path):
    b = copy_captions(local_build, tmp_path / "L")
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
    pid = None
    deadline = time.monotonic() + 120
    while pid is None and t.is_alive() and time.monotonic() < deadline:
        pid = writer_of_a_running_rank(b.root)
        time.sleep(0.05)
    assert pid is not None and pid != os.getpid(), "no generate rank was caught mid-shard"
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive() and not errors, (errors, said)
    assert any("died (exit status -9)" in s and "retry 1 of 3" in s for s in said), said
    got, want = ids(b, "generate"), ids(local_build, "generate")
    assert len(got) == len(set(got)) and sorted(got) == sorted(want)
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


def test_executor_options_are_checked(tmp_path):
    from click.testing import CliRunner

    from dsbuild.cli import cli

    b = new_build(tmp_path / "E")
    r = CliRunner().invoke(cli, ["captions", str(b.root), "--workers", "2", "--rank", "1"])
    assert r.exit_code == 2 and "--rank runs one shard here" in r.output
    r = CliRunner().invoke(cli, ["generate", str(b.root), "--address", "auto"])
    assert r.exit_code != 0 and "--address is for --executor ray" in str(r.exception)


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
