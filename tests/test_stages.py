"""The stage declaration: one place derives Build, signatures, `dsbuild run`, status, the CLI
and the config. A stage that exists only in this test is registered as a plugin, run through
`dsbuild run`, killed mid-shard and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from dsbuild.core import stages
from dsbuild.core.build import Build
from dsbuild.core.config import BuildConfig, apply_overrides, load_recipe
from dsbuild.core.errors import ConfigError, DsbuildError
from dsbuild.core.records import read_jsonl
from dsbuild.core.settings import StageSettings

PLUGIN = textwrap.dedent('''
    """A stage that lives only in the tests: words per input caption."""
    import os

    import click
    from pydantic import Field

    from dsbuild.cli.util import build_argument, echo_result, shard_options
    from dsbuild.core.settings import StageSettings
    from dsbuild.core.stages import Stage, register


    class WordcountSettings(StageSettings):
        field: str = Field("input", description="triple field to count")


    def run_wordcount(build, rank=0, world_size=1, *, force=False):
        log = os.environ.get("WORDCOUNT_LOG")

        def work(writer):
            s = build.config.wordcount
            for t in sorted(build.records("captions"), key=lambda t: t["id"]):
                if t["id"] in writer.done:
                    continue
                if log:
                    with open(log, "a") as fh:
                        fh.write(t["id"] + "\\n")
                writer.write({"id": t["id"], "words": len(t[s.field].split())})
            return {"field": s.field}

        return build.run_stage("wordcount", rank, world_size, work, force=force)


    @click.command("wordcount")
    @build_argument
    @shard_options
    def wordcount_cmd(build, rank, world_size, force, overrides):
        """Count words of BUILD's captions."""
        from dsbuild.core.build import Build

        b = Build.open(build)
        b.update(overrides)
        echo_result(run_wordcount(b, rank, world_size, force=force))


    register(Stage(
        name="wordcount", output="wordcounts", settings=WordcountSettings,
        upstream=("captions",), run="wordcount_stage:run_wordcount",
        command="wordcount_stage:wordcount_cmd", help="count caption words (test stage)",
    ))
''')


@pytest.fixture
def plugin_env(tmp_path):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "wordcount_stage.py").write_text(PLUGIN)
    env = dict(os.environ, DSBUILD_PLUGINS="wordcount_stage", DSBUILD_NO_PROGRESS="1",
               PYTHONPATH=str(tmp_path / "plugin"), WORDCOUNT_LOG=str(tmp_path / "log.txt"))
    return env


def dsbuild(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "dsbuild", *args], env=env, text=True,
                          capture_output=True, timeout=300, **kw)


def test_plugin_stage_runs_is_killed_and_resumes(tmp_path, plugin_env):
    out = tmp_path / "b"
    run = ["run", str(out), "--offline", "--per-agent", "1", "--until", "wordcount"]
    paused = tmp_path / "paused.json"  # the stage stops after its 4th record, until killed
    env = dict(plugin_env, DSBUILD_PAUSE_AT=f"wordcounts/r00000.jsonl:4:{paused}")
    partial = out / "wordcounts" / "r00000.jsonl.partial"
    proc = subprocess.Popen([sys.executable, "-m", "dsbuild", *run], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the test stage has written 4 records
        if paused.exists():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the test stage never started writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written_before = len(partial.read_text().splitlines())
    assert written_before == 4  # killed at its known record
    assert not (out / "wordcounts" / "r00000.jsonl").exists()  # not committed

    st = json.loads(dsbuild(["status", str(out), "--json"], plugin_env).stdout)
    assert st["stages"]["captions"]["complete"]
    assert not st["stages"]["wordcount"]["complete"]
    assert st["stages"]["wordcount"]["in_progress"] == ["r00000.jsonl.partial"]

    r = dsbuild(run, plugin_env)  # resume
    assert r.returncode == 0, r.stderr
    assert "captions  up to date" in r.stdout
    assert "wordcount done" in r.stdout
    assert "\ngenerate" not in r.stdout  # --until runs only what wordcount needs

    triples = {t["id"]: t for t in read_jsonl(out / "triples" / "r00000.jsonl")}
    counts = list(read_jsonl(out / "wordcounts" / "r00000.jsonl"))
    assert sorted(c["id"] for c in counts) == sorted(triples)  # every triple once
    assert all(c["words"] == len(triples[c["id"]]["input"].split()) for c in counts)
    log = (tmp_path / "log.txt").read_text().split()
    # the resumed run skipped what the killed one had written (at most one in flight redone)
    assert len(log) <= len(triples) + 1
    assert len(log) >= len(triples)
    assert written_before < len(triples)

    again = dsbuild(run, plugin_env)
    assert "wordcount up to date" in again.stdout and "nothing to do" in again.stdout

    # its settings section is in dsbuild.yaml; changing it reruns this stage, not captions
    assert "wordcount:" in (out / "dsbuild.yaml").read_text()
    r = dsbuild(["wordcount", str(out), "--set", "wordcount.field=output"], plugin_env)
    assert r.returncode == 0, r.stderr
    assert "wordcount rank 0/1: done" in r.stdout
    st = json.loads(dsbuild(["status", str(out), "--json"], plugin_env).stdout)
    assert st["stages"]["captions"]["complete"] and st["stages"]["wordcount"]["complete"]
    assert len(st["stages"]["wordcount"]["stale_signatures"]) == 1

    # the CLI lists it; without the plugin the build's section is a clear error
    assert "count caption words" in dsbuild(["--help"], plugin_env).stdout
    env = {k: v for k, v in plugin_env.items() if k != "DSBUILD_PLUGINS"}
    r = dsbuild(["status", str(out)], env)
    assert r.returncode == 2 and "wordcount" in r.stderr and "not a known key" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_builtin_stage_is_declared_once_and_everything_derives(tmp_path):
    from click.testing import CliRunner

    from dsbuild.cli import STAGE_COMMANDS, all_commands, cli

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "interior-design.yaml")
    cfg = BuildConfig(recipe=recipe)
    names = stages.names()
    assert names[:6] == ["sources", "captions", "generate", "filter", "verify", "augment"]
    assert names.index("export") > names.index("augment") > names.index("filter")
    commands = all_commands()
    build = Build.init(tmp_path / "b", recipe)
    status = build.status()["stages"]
    for st in stages.all_stages():
        assert isinstance(cfg.stage_settings(st.name), st.settings)  # config section
        assert st.name in status  # status
        assert build.signature(st.name)  # signature
        # its own command (a plugin's, or a built-in's in the cli layer), or one derived from
        # the declaration (dsbuild.cli.stage)
        assert commands[st.cli_name][0] == (st.command or STAGE_COMMANDS.get(st.name) or st)
        res = CliRunner().invoke(cli, [st.cli_name, "--help"])
        assert res.exit_code == 0, res.output
        assert "BUILD" in res.output
    # upstream signatures feed downstream ones
    before = {n: build.signature(n) for n in names}
    build.update(["generate.steps=3"])
    after = {n: build.signature(n) for n in names}
    changed = {n for n in names if before[n] != after[n]}
    assert changed == {"generate", "filter", "verify", "augment", "export"}
    build.update(["split.test_ratio=0.3"])
    assert build.signature("captions") == after["captions"]
    assert build.signature("filter") == after["filter"]
    assert build.signature("augment") != after["augment"]
    assert build.signature("export") != after["export"]


def test_register_rejects_unknown_upstream_and_duplicates():
    from dsbuild.core.settings import StageSettings

    class S(StageSettings):
        pass

    with pytest.raises(DsbuildError, match="not a stage"):
        stages.register(stages.Stage(name="x1", output="x1", settings=S, run="m:f", help="",
                                     upstream=("nope",)))
    with pytest.raises(DsbuildError, match="already registered"):
        stages.register(stages.Stage(name="captions", output="t", settings=S, run="m:f",
                                     help=""))
    with pytest.raises(DsbuildError, match="config section"):
        stages.register(stages.Stage(name="split", output="t", settings=S, run="m:f", help=""))
    with pytest.raises(ValueError, match="cannot sign"):
        stages.Stage(name="x2", output="x2", settings=S, run="m:f", help="", signs=("bogus",))
    assert "x1" not in stages.names()


def test_legacy_split_keys_and_override_errors(tmp_path):
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "interior-design.yaml")
    cfg = BuildConfig(recipe=recipe)
    data = cfg.model_dump(mode="json")
    del data["split"]
    data["export"]["test_ratio"] = 0.25  # a dsbuild.yaml written before split had a section
    assert BuildConfig.model_validate(data).split.test_ratio == 0.25
    assert apply_overrides(cfg, ["export.seed=9"]).split.seed == 9
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfg, ["captions.seed.x=1"])
    assert "captions.seed is a value, not a section" in str(e.value)
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfg, ["generate.stepz=3"])
    assert "generate.stepz" in str(e.value) and "not a known key" in str(e.value)


def test_export_to_other_folder_does_not_change_the_build(tmp_path):
    """`dsbuild export --set ... --to OTHER` must not change what a plain export writes."""
    from click.testing import CliRunner

    from dsbuild.cli import cli

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "interior-design.yaml")
    build = Build.init(tmp_path / "b", recipe)
    before = (build.root / "dsbuild.yaml").read_text()
    res = CliRunner().invoke(cli, ["export", str(build.root), "--export-dir", str(tmp_path / "o"),
                                   "--set", "split.test_ratio=0.5"])
    # filter has not run, so the export stops with a clear message, but nothing was saved
    assert res.exit_code != 0
    assert (build.root / "dsbuild.yaml").read_text() == before


class DerivedSettings(StageSettings):
    field: Literal["input", "output"] = Field("input", description="what to echo")
    repeat: int = Field(1, ge=1, description="how many records")


def run_derived(build, rank=0, world_size=1, *, force=False):
    def work(writer):
        s = build.config.derived
        for i in range(s.repeat):
            if str(i) not in writer.done:
                writer.write({"id": str(i), "field": s.field})
        return {"field": s.field}

    return build.run_stage("derived", rank, world_size, work, force=force)


def derived_summary(build, result) -> list[str]:
    return [f"  echoed {result.stats['field']}"]


def test_a_stage_without_a_command_gets_a_derived_one(tmp_path):
    """`command=None`: BUILD, the shard options, --set, --force and the declared options come
    from the declaration; the options are saved into dsbuild.yaml; the summary is printed."""
    from click.testing import CliRunner

    from dsbuild.cli import all_commands, cli

    st = stages.register(stages.Stage(
        name="derived", output="derived", settings=DerivedSettings, help="echo a setting",
        run="test_stages:run_derived", summary="test_stages:derived_summary",
        options=("field",)))
    try:
        assert all_commands()["derived"][0] is st
        recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "interior-design.yaml")
        build = Build.init(tmp_path / "b", recipe)
        help_text = CliRunner().invoke(cli, ["derived", "--help"]).output
        assert "--field [input|output]" in help_text and "--world-size" in help_text
        assert "--repeat" not in help_text  # only the declared options
        r = CliRunner().invoke(cli, ["derived", str(build.root), "--field", "output",
                                     "--set", "derived.repeat=3"])
        assert r.exit_code == 0, r.output
        assert "derived rank 0/1: done, 3 records" in r.output
        assert "echoed output" in r.output
        saved = Build.open(build.root).config.derived
        assert (saved.field, saved.repeat) == ("output", 3)
        r = CliRunner().invoke(cli, ["derived", str(build.root), "--field", "sideways"])
        assert r.exit_code == 2 and "sideways" in r.output
    finally:
        stages.unregister("derived")
