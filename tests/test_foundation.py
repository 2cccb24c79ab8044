"""Build directory, record IO, config errors, markers and the CLI basics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dsbuild.cli import cli
from dsbuild.core.build import Build, select_shard
from dsbuild.core.config import load_recipe
from dsbuild.core.errors import ConfigError, DsbuildError, RecordError
from dsbuild.core.hashing import content_id
from dsbuild.core.records import ShardWriter, atomic_open, read_jsonl


def test_bad_recipe_names_file_line_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "name: bad\nagents:\n  - name: Chairs!\n    level: attic\n    context: c\n"
        "    count: 3\n    examples: [{input: a, edit: b, output: c}]\n"
        "    vocabulary: {subjects: [chair], colour: [red]}\n"
    )
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "line 3: agents[0].name" in msg
    assert "line 4: agents[0].level" in msg
    assert "agents[0].vocabulary.colour: is not a known key" in msg


def test_init_writes_nothing_for_bad_recipe(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nagents: [\n")
    res = CliRunner().invoke(cli, ["init", str(tmp_path / "b"), "--recipe", str(p)])
    assert res.exit_code != 0
    assert "not valid YAML" in str(res.exception) + res.output
    assert not (tmp_path / "b").exists()


def test_init_status_and_overrides(tmp_path, mini_recipe):
    r = CliRunner().invoke(cli, ["init", str(tmp_path / "b"), "--recipe", str(mini_recipe),
                                 "--set", "captions.seed=7"])
    assert r.exit_code == 0, r.output
    b = Build.open(tmp_path / "b")
    assert b.config.captions.seed == 7
    r = CliRunner().invoke(cli, ["status", str(tmp_path / "b"), "--json"])
    st = json.loads(r.output)
    assert st["stages"]["captions"]["complete"] is False
    with pytest.raises(ConfigError):
        b.update(["captions.nope=1"])


def test_secrets_never_in_config(tmp_path, mini_recipe, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    b = Build.init(tmp_path / "b", load_recipe(mini_recipe))
    assert "sk-secret-123" not in (tmp_path / "b" / "dsbuild.yaml").read_text()
    assert b.config.captions.api_key_env == "OPENAI_API_KEY"


def test_run_stage_markers_resume_and_signature(mini_build):
    calls = []

    def work(w):
        for i in range(5):
            if f"t{i}" in w.done:
                continue
            calls.append(i)
            w.write({"id": f"t{i}", "v": i})
        return {"written": 5}

    r1 = mini_build.run_stage("captions", 0, 1, work)
    assert not r1.skipped and r1.records == 5
    r2 = mini_build.run_stage("captions", 0, 1, work)
    assert r2.skipped and len(calls) == 5
    assert [r["id"] for r in mini_build.records("captions")] == [f"t{i}" for i in range(5)]
    # a settings change renames the signature: the stage is no longer done, downstream too
    sig_gen = mini_build.signature("generate")
    mini_build.update(["captions.seed=3"])
    assert not mini_build.is_complete("captions")
    assert mini_build.signature("generate") != sig_gen
    # volatile settings do not change the signature
    sig = mini_build.signature("captions")
    mini_build.update(["captions.concurrency=3"])
    assert mini_build.signature("captions") == sig


def test_world_size_mismatch_is_refused(mini_build):
    mini_build.run_stage("captions", 0, 2, lambda w: None)
    with pytest.raises(DsbuildError, match="world-size 2"):
        mini_build.run_stage("captions", 0, 1, lambda w: None)
    with pytest.raises(DsbuildError, match=r"ranks \[1\]"):
        list(mini_build.records("captions"))


def test_shard_writer_recovers_torn_tail(tmp_path):
    out = tmp_path / "r00000.jsonl"
    w = ShardWriter(out)
    w.write({"id": "a"})
    w.write({"id": "b"})
    w.close()
    with open(out.with_name(out.name + ".partial"), "a") as fh:
        fh.write('{"id": "c", "trunc')
    w2 = ShardWriter(out)
    assert w2.done == {"a", "b"}
    w2.write({"id": "b"})  # duplicate is ignored
    w2.write({"id": "c"})
    assert w2.commit() == 3
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b", "c"]


def test_shard_writer_survives_sigkill(tmp_path):
    out = tmp_path / "r00000.jsonl"
    code = (  # writes until killed, so the kill always lands mid-stream
        "import itertools\nfrom dsbuild.core.records import ShardWriter\n"
        f"w = ShardWriter({str(out)!r})\n"
        "for i in itertools.count():\n"
        "    w.write({'id': str(i), 'pad': 'x' * 200})\n"
        "    if i == 500: print('ready', flush=True)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait()
    assert not out.exists()
    w = ShardWriter(out)
    n = len(w.done)
    assert n >= 500 and w.done == {str(i) for i in range(n)}  # every flushed line, in order
    total = n + 1000
    for i in range(total):  # a resumed stage writes everything again; done ids are skipped
        w.write({"id": str(i), "pad": "x" * 200})
    assert w.commit() == total
    ids = [r["id"] for r in read_jsonl(out)]
    assert ids == [str(i) for i in range(total)]


def test_atomic_open_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write("new")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_read_jsonl_names_bad_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(RecordError, match=r"x.jsonl:2"):
        list(read_jsonl(f))


def test_content_ids_and_sharding_are_stable():
    assert content_id("a", 1) == content_id("a", 1) != content_id("a", 2)
    items = [{"id": content_id(i)} for i in range(200)]
    parts = [select_shard(items, r, 3, key=lambda x: x["id"]) for r in range(3)]
    assert sum(len(p) for p in parts) == 200
    assert all(len(p) > 30 for p in parts)
    with pytest.raises(DsbuildError):
        select_shard(items, 3, 3, key=lambda x: x["id"])


def test_builders_write_a_readable_build(mini_build):
    from builders import make_build

    out = make_build(mini_build, samples=2)
    assert mini_build.is_complete("filter")
    pairs = list(mini_build.records("generate"))
    assert len(pairs) == len(out["pairs"]) == 12
    assert all((mini_build.root / p["images"]["input"]).exists() for p in pairs)
    assert len(list(mini_build.records("filter"))) == 12


def test_cli_reference_matches_the_commands():
    """docs/cli.md is generated from the click commands; regenerate it when this fails."""
    import subprocess
    import sys
    from pathlib import Path

    # a fresh process: click caches each command's help option on first use, and commands
    # other tests invoked directly would render "--help" where the CLI shows "-h, --help"
    rendered = subprocess.run([sys.executable, "-m", "dsbuild.cli.doc"], capture_output=True,
                              text=True, check=True).stdout
    page = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert page.read_text() == rendered, (
        "docs/cli.md is out of date: run `python -m dsbuild.cli.doc > docs/cli.md`")


def test_augment_follows_the_export_split_settings(mini_build):
    """augment places no-change samples by the export's split, so a new split reruns it."""
    before = {s: mini_build.signature(s) for s in ("captions", "filter", "augment")}
    mini_build.update(["export.seed=7"])
    after = {s: mini_build.signature(s) for s in before}
    assert after["captions"] == before["captions"] and after["filter"] == before["filter"]
    assert after["augment"] != before["augment"]


def test_decisions_each_tools_current_one_and_withdrawals(mini_build):
    """The decision in force: the latest (by time, then file order) of the tools' current
    decisions; a snapshot pull withdraws what its tool no longer holds."""
    from dsbuild.core.decisions import add_decisions, latest_by_pair, make_decision

    def d(pid, verdict, tool, at, **kw):
        return make_decision(pid, verdict, tool=tool, reviewer="r", at=at, **kw)

    assert len(add_decisions(mini_build, [
        d("p1", "reject", "labelstudio", "2026-01-02T00:00:00Z"),
        d("p1", "accept", "fiftyone", "2026-01-03T00:00:00Z"),
        d("p2", "accept", "labelstudio", "2026-01-05T00:00:00Z")])) == 3
    assert {k: v["verdict"] for k, v in latest_by_pair(mini_build).items()} == \
        {"p1": "accept", "p2": "accept"}
    # a repeat adds nothing; an older-timed change is still the tool's current decision
    t5, t4 = "2026-01-05T00:00:00Z", "2026-01-04T00:00:00Z"
    assert add_decisions(mini_build, [d("p2", "accept", "labelstudio", t5)]) == []
    assert len(add_decisions(mini_build, [d("p2", "reject", "labelstudio", t4)])) == 1
    assert latest_by_pair(mini_build)["p2"]["verdict"] == "reject"
    # equal times: the decision appended last wins, whichever tool spoke first
    t9 = "2026-01-09T00:00:00Z"
    add_decisions(mini_build, [d("p3", "accept", "labelstudio", t9),
                               d("p3", "accept", "fiftyone", t9)])
    add_decisions(mini_build, [d("p3", "reject", "labelstudio", t9)])
    assert latest_by_pair(mini_build)["p3"]["verdict"] == "reject"
    # a FiftyOne snapshot without p1's verdict withdraws it: Label Studio's reject is in force
    # again; p3 (still held) and p9 (not shown by the tool) are left alone
    gone = add_decisions(mini_build, [d("p3", "accept", "fiftyone", t9)],
                         withdraw=("fiftyone", {"p1", "p3"}))
    assert [(g["pair_id"], g["verdict"]) for g in gone] == [("p1", "withdrawn")]
    assert latest_by_pair(mini_build)["p1"]["tool"] == "labelstudio"
    assert add_decisions(mini_build, [], withdraw=("fiftyone", {"p1"})) == []
    assert mini_build.status()["decisions"] == {"labelstudio:reject": 3, "fiftyone:accept": 1}


def test_concurrent_decision_writes_say_waiting_once(mini_build, monkeypatch, capfd):
    """Every decision write that finds decisions.jsonl's lock taken waits for it; the first
    says so (who holds it), the next ones wait silently instead of one line each (hundreds
    under many writers). The lock is made busy for every try, so each write waits."""
    import fcntl

    from dsbuild.core import locks
    from dsbuild.core.decisions import add_decisions, make_decision, read_decisions

    real = fcntl.flock

    def contended(fd, op):
        if op & fcntl.LOCK_NB:
            raise BlockingIOError  # another writer holds it
        return real(fd, op)

    monkeypatch.setattr(locks, "_told", set())
    monkeypatch.setattr(locks.fcntl, "flock", contended)
    for i in range(50):
        add_decisions(mini_build, [make_decision(f"p{i}", "accept", tool="fiftyone")])
    monkeypatch.setattr(locks.fcntl, "flock", real)
    assert len(read_decisions(mini_build)) == 50
    err = capfd.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("waiting:")] == [
        f"waiting: {mini_build.decisions_path} is being written by another process"]
