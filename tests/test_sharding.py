"""Shard resume is keyed on the whole sharding: a partial of another world size is kept only
where its records all belong to the rank now (else set aside and named), two shardings of one
stage never run at once, a kill between commit and marker reads as recoverable in `status`,
and commit-point litter goes with the next run. Kills land at a known record
(``DSBUILD_PAUSE_AT``), never on a timer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe
from dsbuild.core.records import count_lines

RECIPE = Path(__file__).parent.parent / "recipes" / "interior-design.yaml"
ENV = dict(os.environ, DSBUILD_NO_PROGRESS="1")


def new_build(root: Path) -> Build:
    """A template-captions build of a quarter of the built-in recipe (520 triples)."""
    return Build.init(root, load_recipe(RECIPE), recipe_path=str(RECIPE),
                      overrides=["captions.backend=template", "captions.count_scale=0.25"])


def dsbuild(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsbuild", *map(str, args)], env=ENV,
                          text=True, capture_output=True, timeout=300, **kw)


def paused(tmp_path: Path, shard: str, at: int, *args, stderr=subprocess.PIPE) -> subprocess.Popen:
    """`dsbuild ARGS`, stopped once ``shard``'s partial holds ``at`` records (the pause hook
    creates a file then; waiting for it is an event, not a sleep)."""
    flag = tmp_path / f"paused-{shard.replace('/', '_')}-{at}"
    proc = subprocess.Popen([sys.executable, "-m", "dsbuild", *map(str, args)], text=True,
                            env=dict(ENV, DSBUILD_PAUSE_AT=f"{shard}:{at}:{flag}"),
                            stdout=subprocess.PIPE, stderr=stderr)
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        _wait_a_little(proc)
    return proc


def _wait_a_little(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=0.05)
    except subprocess.TimeoutExpired:
        pass


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> list[dict]:
    """Every triple of one uninterrupted template captions run, by id."""
    b = new_build(tmp_path_factory.mktemp("clean") / "b")
    r = dsbuild("captions", b.root)
    assert r.returncode == 0, r.stderr
    return sorted(b.records("captions"), key=lambda t: t["id"])


def records(b: Build) -> list[dict]:
    return sorted(Build.open(b.root).records("captions"), key=lambda t: t["id"])


def test_kill_then_resume_under_another_sharding_equals_a_clean_run(tmp_path, clean):
    """One rank killed at 100 records, resumed as two ranks: the old partial holds records of
    both new ranks, so it is set aside (named), never kept whole. Before: 100 duplicates."""
    b = new_build(tmp_path / "b")
    kill(paused(tmp_path, "triples/r00000.jsonl", 100, "captions", b.root))
    partial = b.root / "triples" / "r00000.jsonl.partial"
    assert count_lines(partial) == 100
    r0 = dsbuild("captions", b.root, "--rank", 0, "--world-size", 2)
    assert r0.returncode == 0, r0.stderr
    assert f"note: {partial} was written under another sharding of captions (world size 1)" \
        in r0.stderr and "100 records are set aside in" in r0.stderr
    aside = list((b.root / "triples" / "set-aside").glob("r00000-ws1-*.jsonl"))
    assert len(aside) == 1 and count_lines(aside[0]) == 100
    r1 = dsbuild("captions", b.root, "--rank", 1, "--world-size", 2)
    assert r1.returncode == 0, r1.stderr
    assert records(b) == clean  # record for record: none duplicated, none lost
    st = Build.open(b.root).status()["stages"]["captions"]
    assert st["complete"] and st["records"] == len(clean) and st["world_size"] == 2


def test_two_ranks_resumed_as_one_keep_rank_0_and_set_aside_rank_1(tmp_path, clean):
    """Two ranks killed (rank 0 mid-shard, rank 1 committed without its marker), resumed as one
    rank: every record of old rank 0 belongs to the one rank, so its partial is resumed; rank
    1's commit is not taken for a finished world-size-1 shard (before: the stage read complete
    with rank 1's records only, or duplicated them)."""
    b = new_build(tmp_path / "b")
    kill(paused(tmp_path, "triples/r00000.jsonl", 60, "captions", b.root, "--rank", 0,
                "--world-size", 2))
    # rank 1 of 2 committed, then killed before its marker: the state _write_shard leaves
    assert dsbuild("captions", b.root, "--rank", 1, "--world-size", 2).returncode == 0
    b = Build.open(b.root)
    shard1 = b.root / "triples" / "r00001.jsonl"
    n1 = count_lines(shard1)
    (b.marker_dir("captions") / "r00001").unlink()
    (shard1.with_name(shard1.name + ".commit.json")).write_text(json.dumps(
        {"signature": b.signature("captions"), "world_size": 2, "key": "id", "records": n1,
         "stats": {}}))
    r = dsbuild("captions", b.root)
    assert r.returncode == 0, r.stderr
    assert f"done, {len(clean)} records" in r.stdout, r.stdout
    assert "r00000.jsonl.partial was written" not in r.stderr  # kept: all its records are ours
    assert f"note: {shard1} was written under another sharding" in r.stderr
    assert records(b) == clean


def test_a_commit_of_another_sharding_resumes_where_its_records_are_ours(tmp_path, clean):
    """Rank 0 of 2 committed without a marker, resumed as one rank: its shard becomes the
    partial rank 0 resumes (nothing set aside, nothing redone twice)."""
    b = new_build(tmp_path / "b")
    assert dsbuild("captions", b.root, "--rank", 0, "--world-size", 2).returncode == 0
    b = Build.open(b.root)
    shard0 = b.root / "triples" / "r00000.jsonl"
    n0 = count_lines(shard0)
    (b.marker_dir("captions") / "r00000").unlink()
    (shard0.with_name(shard0.name + ".commit.json")).write_text(json.dumps(
        {"signature": b.signature("captions"), "world_size": 2, "key": "id", "records": n0,
         "stats": {}}))
    r = dsbuild("captions", b.root)
    assert r.returncode == 0 and "set aside" not in r.stderr, r.stderr
    assert records(b) == clean


def test_two_shardings_at_once_the_second_exits_2_naming_the_first(tmp_path, clean):
    """Before: both ran and exited 0 (world-size checks under per-rank locks cannot see the
    other writer), with duplicated records."""
    b = new_build(tmp_path / "b")
    first = paused(tmp_path, "triples/r00000.jsonl", 50, "captions", b.root)
    try:
        r = dsbuild("captions", b.root, "--rank", 1, "--world-size", 2)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert f"captions of {b.root} is running sharded 1 way (--world-size 1) by rank 0: " \
               f"PID {first.pid}" in r.stderr and "--wait" in r.stderr
        assert not (b.root / "triples" / "r00001.jsonl.partial").exists()
        # --wait: waits (said once), and runs once the first sharding is gone
        errf = tmp_path / "wait.err"
        with open(errf, "w") as fh:
            waiting = subprocess.Popen([sys.executable, "-m", "dsbuild", "captions", b.root,
                                        "--rank", "1", "--world-size", "2", "--wait"],
                                       env=ENV, text=True, stdout=subprocess.PIPE, stderr=fh)
            while "waiting: captions of" not in errf.read_text():
                assert waiting.poll() is None, errf.read_text()
                _wait_a_little(waiting)
    finally:
        kill(first)
    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, errf.read_text()
    assert errf.read_text().count("waiting:") == 1
    assert "set aside" in errf.read_text()  # the killed sharding's partial, by the waiter
    assert dsbuild("captions", b.root, "--rank", 0, "--world-size", 2).returncode == 0
    assert records(b) == clean


def test_status_after_a_kill_between_commit_and_marker_says_it_is_recoverable(tmp_path):
    """Before: `status` said "not run" though the next run only checks and marks the shard."""
    b = new_build(tmp_path / "b")
    assert dsbuild("captions", b.root).returncode == 0
    shard = b.root / "triples" / "r00000.jsonl"
    n = count_lines(shard)
    (b.marker_dir("captions") / "r00000").unlink()
    shard.with_name(shard.name + ".commit.json").write_text(json.dumps(
        {"signature": b.signature("captions"), "world_size": 1, "key": "id", "records": n,
         "stats": {}}))
    st = dsbuild("status", b.root)
    line = next(x for x in st.stdout.splitlines() if x.strip().startswith("captions"))
    assert "committed, marker pending — the next run finishes it" in line, st.stdout
    assert Build.open(b.root).status()["stages"]["captions"]["committed"] == [0]
    mtime = shard.stat().st_mtime_ns
    r = dsbuild("captions", b.root)
    assert r.returncode == 0 and f"done, {n} records" in r.stdout, r.stdout + r.stderr
    assert shard.stat().st_mtime_ns == mtime  # checked and marked, not redone
    st = dsbuild("status", b.root)
    assert "complete" in next(x for x in st.stdout.splitlines()
                              if x.strip().startswith("captions"))


def test_commit_point_litter_is_cleaned_by_the_next_run(tmp_path):
    """Temp files of atomic writes cut short, a finished rank's commit note and signature file
    (a kill after the marker), a commit note and a partial of older settings: all gone after
    the next run, which changes nothing else. Before: each stayed for good."""
    b = new_build(tmp_path / "b")
    assert dsbuild("captions", b.root).returncode == 0
    b = Build.open(b.root)
    out, mdir = b.root / "triples", b.marker_dir("captions")
    shard, marker = out / "r00000.jsonl", mdir / "r00000"
    keep = {p: p.read_bytes() for p in (shard, marker)}
    sig = b.signature("captions")
    litter = [
        out / "r00000.jsonl.commit.json", out / "r00000.jsonl.partial.sig",  # after the marker
        out / ".r00000.jsonl.partial.sig.abc123.tmp", out / ".r00000.jsonl.commit.json.x.tmp",
        mdir / ".r00000.q1w2e3.tmp",
        out / "r00002.jsonl.commit.json",  # a commit note of older settings, no shard
        out / "r00003.jsonl.partial", out / "r00003.jsonl.partial.sig",  # older settings
    ]
    for f in litter:
        f.write_text("{}\n")
    (out / "r00000.jsonl.commit.json").write_text(json.dumps({"signature": sig}))
    (out / "r00000.jsonl.partial.sig").write_text(json.dumps({"signature": sig}))
    (out / "r00003.jsonl.partial.sig").write_text("0123456789abcdef")
    r = dsbuild("captions", b.root)
    assert r.returncode == 0 and "already done" in r.stdout, r.stdout + r.stderr
    assert [f for f in litter if f.exists()] == []
    assert {p: p.read_bytes() for p in keep} == keep
    assert Build.open(b.root).status()["stages"]["captions"]["complete"]
