"""``dsbuild run``: every stage end to end, each resuming where it stopped.

The stages and their order come from their declarations (:mod:`dsbuild.core.stages`): captions →
generate → filter → verify → augment → diversity → export for the built-in ones, plus any
registered plugin stage. Each runs through ``Build.run_stage`` (done ranks skipped, partial
ones resumed, a marker written last), so a second run with the same settings does nothing and
a killed run continues where it stopped. A stage whose optional dependency is missing stops
the run with its pip line. ``--offline`` freezes a demo-sized build into dsbuild.yaml: template
captions, the built-in tiny models, a few triples per agent and a few small samples each, so
the whole run needs no network and finishes in minutes on a laptop. Tiny models make
placeholder images; the run says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from dsbuild.cli.util import executor_options, wait_option
from dsbuild.core import stages
from dsbuild.core.build import Build
from dsbuild.core.config import default_recipe_path, load_recipe
from dsbuild.core.errors import DsbuildError
from dsbuild.executors import ExecutorOptions, make_executor

DEMO_TRIPLES_PER_AGENT = 2


def offline_settings() -> list[str]:
    """Every stage's own offline values (its declaration's ``offline``) as overrides."""
    return [f"{st.name}.{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for st in stages.all_stages() for key, value in st.offline.items()]


OFFLINE_NOTE = ("offline: template captions and dsbuild's built-in tiny models with random "
                "weights. Tiny models make PLACEHOLDER images (noise), not real pictures, and "
                "their CLIP scores mean nothing (filter thresholds are off). Use a real SD "
                "checkpoint (generate.model) and CLIP model (filter.clip_model) for real data.")


@dataclass
class StageOutcome:
    stage: str
    state: str  # done | skipped (up to date)
    detail: str = ""
    seconds: float = 0.0


@dataclass
class RunResult:
    build: Build
    outcomes: list[StageOutcome] = field(default_factory=list)
    export_path: Path | None = None

    @property
    def did_nothing(self) -> bool:
        return all(o.state != "done" for o in self.outcomes)


def run_settings(offline: bool, limit: int | None) -> list[str]:
    """The overrides a run freezes into dsbuild.yaml."""
    out = offline_settings() if offline else []
    if limit is not None:
        out.append(f"captions.limit={limit}")
    elif offline:
        out.append(f"captions.limit={DEMO_TRIPLES_PER_AGENT}")
    return out


def open_or_init(recipe: str | Path | None, out: str | Path, overrides: list[str]) -> Build:
    """Reuse BUILD when it exists (same recipe), else create it from RECIPE."""
    recipe_path = Path(recipe) if recipe else default_recipe_path()
    r = load_recipe(recipe_path)
    root = Path(out)
    if (root / "dsbuild.yaml").exists():
        build = Build.open(root)
        if build.recipe != r:
            raise DsbuildError(
                f"{root} was made from another recipe ({build.recipe.name!r}, or {recipe_path} "
                "changed since); use a new --out, or `dsbuild init --force` to re-freeze it")
        build.update(overrides)
        return build
    return Build.init(root, r, recipe_path=str(recipe_path), overrides=overrides)


def run_pipeline(recipe: str | Path | None, out: str | Path, *, offline: bool = False,
                 limit: int | None = None, until: str | None = None,
                 echo: Callable[[str], None] = print,
                 executor: ExecutorOptions | None = None) -> RunResult:
    """Run every stage (or those ``until`` needs) on BUILD, created from RECIPE if new.
    Sharded stages run on ``executor`` (default: in this process, one shard); the others
    run here."""
    overrides = run_settings(offline, limit)
    order = stages.needed_for(until) if until else [s.name for s in stages.all_stages()]
    for name in order:  # missing extras fail first
        stages.get(name).load_run()
    if offline:
        echo(OFFLINE_NOTE)
    build = open_or_init(recipe, out, overrides)
    result = RunResult(build)
    with make_executor(executor, echo=echo) as ex:
        for name in order:
            _run_one(ex, build, name, result, echo)
    if result.did_nothing:
        echo("nothing to do: every stage is up to date")
    if result.export_path:
        echo(f"load it with: datasets.load_dataset({str(result.export_path)!r})")
    return result


def _run_one(ex, build: Build, name: str, result: RunResult, echo: Callable[[str], None]):
    """Run one stage on the executor and note its outcome."""
    t0 = time.perf_counter()
    res = ex.run(build, name)
    o = StageOutcome(name, "skipped" if res.skipped else "done", describe(res),
                     time.perf_counter() - t0)
    if name == "export":
        result.export_path = build.output_dir("export")
    result.outcomes.append(o)
    echo(f"{name:<9} {_label(o):<24} {o.detail}"
         + (f"  [{o.seconds:.1f}s]" if o.state == "done" else ""))


def describe(res) -> str:
    """One line about a stage's result: its own summary, else the record count."""
    return res.stats.get("summary") or f"{res.records} records"


def _label(o: StageOutcome) -> str:
    return {"done": "done", "skipped": "up to date (skipped)"}[o.state]


@click.command("run")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="build directory (created, or reused and resumed)")
@click.option("--offline", is_flag=True,
              help="template captions + built-in tiny models, demo size; no network")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="caption triples per agent (offline default: "
                   f"{DEMO_TRIPLES_PER_AGENT})")
@click.option("--until", default=None, metavar="STAGE",
              help="run only this stage and the stages it needs")
@wait_option
@executor_options
def run_cmd(recipe, out, offline, limit, until, executor):
    """Run every stage (captions → generate → filter → verify → augment → diversity → export) on
    RECIPE into BUILD.

    RECIPE defaults to the built-in interior-design recipe. Each stage resumes where it
    stopped; a second run with the same settings does nothing.
    """
    if until is not None and stages.find(until) is None:
        raise click.BadParameter(f"no stage {until!r} (stages: {', '.join(stages.names())})",
                                 param_hint="--until")
    run_pipeline(recipe, out, offline=offline, limit=limit, until=until, echo=click.echo,
                 executor=executor)
