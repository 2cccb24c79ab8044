"""``dsbuild run``: every stage end to end, each resuming where it stopped.

The stages and their order come from their declarations (:mod:`dsbuild.core.stages`): sources
(only where the build configures photos; otherwise off, and skipped) → captions →
generate → filter → verify → augment → diversity → export for the built-in ones, plus any
registered plugin stage. Each runs through ``Build.run_stage`` (done ranks skipped, partial
ones resumed, a marker written last), so a second run with the same settings does nothing and
a killed run continues where it stopped. A stage whose optional dependency is missing stops
the run with its pip line. ``--offline`` freezes a demo-sized build into dsbuild.yaml: template
captions, the built-in tiny models, a few triples per agent and a few small samples each, so
the whole run needs no network and finishes in minutes on a laptop. Tiny models make
placeholder images; the run says so. ``--set`` gives settings as ``dsbuild init`` does, and
``--offline`` fills in only the ones it does not give. An existing build keeps its frozen
settings: a run that would change any (``--offline`` included) is refused with the
differences listed, unless ``--reconfigure``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from dsbuild.cli.options import renamed_option
from dsbuild.cli.util import cut_note, executor_options, wait_option
from dsbuild.core import stages
from dsbuild.core.build import Build
from dsbuild.core.config import (
    apply_overrides,
    config_changes,
    current_key,
    default_recipe_path,
    load_recipe,
)
from dsbuild.core.deprecation import notice
from dsbuild.core.errors import DsbuildError
from dsbuild.executors import ExecutorOptions, make_executor

DEMO_TRIPLES_PER_AGENT = 2


OFFLINE_NOTE = ("offline: template captions and dsbuild's built-in tiny models with random "
                "weights. Tiny models make PLACEHOLDER images (noise), not real pictures, and "
                "their CLIP scores mean nothing (filter thresholds are off). Use a real SD "
                "checkpoint (generate.model) and CLIP model (filter.clip_model) for real data.")


@dataclass
class StageOutcome:
    stage: str
    state: str  # done | skipped (up to date) | off (an optional stage not configured)
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


def run_settings(offline: bool, per_agent: int | None, sets: list[str] | tuple[str, ...] = ()
                 ) -> list[str]:
    """The overrides a run freezes into dsbuild.yaml: the user's ``--set`` and
    ``--per-agent``, and with ``offline`` each stage's demo value for every setting the user
    did not give (under its old name or its new one)."""
    user = [*sets, *([f"captions.per_agent={per_agent}"] if per_agent is not None else [])]
    given = {current_key(item.split("=", 1)[0].strip()) for item in user}
    if not offline:
        return user
    demo = [*stages.offline_settings(), f"captions.per_agent={DEMO_TRIPLES_PER_AGENT}"]
    return [*(o for o in demo if o.split("=", 1)[0] not in given), *user]


def open_or_init(recipe: str | Path | None, out: str | Path, overrides: list[str],
                 reconfigure: bool = False) -> Build:
    """Reuse BUILD when it exists (with its own recipe; a RECIPE given must be the same),
    else create it from RECIPE (default: the built-in one). A reused build's frozen settings
    change only with ``reconfigure``: otherwise settings that differ are refused, listed.
    Nothing is saved unless the settings validate and their models load."""
    from dsbuild.cli.util import save_settings
    from dsbuild.models.available import check_models

    root = Path(out)
    recipe_path = Path(recipe) if recipe else default_recipe_path()
    if not (root / "dsbuild.yaml").exists():
        return Build.init(root, load_recipe(recipe_path), recipe_path=str(recipe_path),
                          overrides=overrides, check=check_models)
    build = Build.open(root)
    if recipe is not None and build.recipe != load_recipe(recipe_path):
        raise DsbuildError(
            f"{root} was made from another recipe ({build.recipe.name!r}, or {recipe_path} "
            "changed since); use a new BUILD folder, or `dsbuild init --force` to re-freeze it")
    changes = config_changes(build.config, apply_overrides(build.config, overrides))
    if changes and not reconfigure:
        listed = "\n".join(f"  {key}: {_shown(old)} -> {_shown(new)}" for key, old, new in changes)
        raise DsbuildError(
            f"{root / 'dsbuild.yaml'}: this run would change {len(changes)} frozen "
            f"setting{'s' * (len(changes) > 1)}; pass --reconfigure to save the change (the "
            "stages it touches are recomputed), or drop the options that make it:\n" + listed)
    save_settings(build, overrides)
    return build


def _shown(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def run_pipeline(recipe: str | Path | None, out: str | Path, *, offline: bool = False,
                 per_agent: int | None = None, until: str | None = None,
                 echo: Callable[[str], None] = print,
                 executor: ExecutorOptions | None = None,
                 sets: list[str] | tuple[str, ...] = (), reconfigure: bool = False) -> RunResult:
    """Run every stage (or those ``until`` needs) on BUILD, created from RECIPE if new, with
    the ``sets`` (``STAGE.KEY=VALUE``) settings; an existing build's settings change only with
    ``reconfigure``. Sharded stages run on ``executor`` (default: in this process, one
    shard); the others run here."""
    overrides = run_settings(offline, per_agent, sets)
    order = stages.needed_for(until) if until else [s.name for s in stages.all_stages()]
    for name in order:  # missing extras fail first
        stages.get(name).load_run()
    build = open_or_init(recipe, out, overrides, reconfigure)
    if offline:
        echo(OFFLINE_NOTE)
    result = RunResult(build)
    with make_executor(executor, echo=echo) as ex:
        for name in order:
            if not build.is_active(name):  # an optional stage this build does not configure
                result.outcomes.append(StageOutcome(name, "off"))
                continue
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
    if o.state == "done" and (note := cut_note(build, name)):
        echo(f"{'':<9} {note}")


def describe(res) -> str:
    """One line about a stage's result: its own summary, else the record count."""
    return res.stats.get("summary") or f"{res.records} records"


def _label(o: StageOutcome) -> str:
    return {"done": "done", "skipped": "up to date (skipped)"}[o.state]


@click.command("run")
@renamed_option("--limit", "--per-agent", "per_agent", type=click.IntRange(min=1))
@click.argument("build", required=False, type=click.Path())
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="recipe YAML of a new BUILD (default: the built-in interior-design recipe; "
                   "an existing BUILD keeps its own)")
@click.option("--out", hidden=True, type=click.Path(file_okay=False), default=None)
@click.option("--offline", is_flag=True,
              help="template captions + built-in tiny models, demo size, for every setting "
                   "--set does not give; no network")
@click.option("--per-agent", type=click.IntRange(min=1), default=None,
              help="caption triples per agent, saved as captions.per_agent (offline default: "
                   f"{DEMO_TRIPLES_PER_AGENT})")
@click.option("--set", "sets", multiple=True, metavar="STAGE.KEY=VALUE",
              help="stage setting to freeze into dsbuild.yaml (repeatable), as `dsbuild init`")
@click.option("--reconfigure", is_flag=True,
              help="on an existing BUILD, save settings that differ from its frozen ones "
                   "(else they are refused, listed)")
@click.option("--until", default=None, metavar="STAGE",
              help="run only this stage and the stages it needs")
@wait_option
@executor_options
def run_cmd(build, recipe, out, offline, per_agent, sets, reconfigure, until, executor):
    """Run every stage ([sources →] captions → generate → filter → verify → augment → diversity
    → export) on BUILD, created from --recipe when it is new.

    The recipe defaults to the built-in interior-design recipe. Each stage resumes where it
    stopped; a second run with the same settings does nothing. On an existing BUILD, settings
    (--set, --per-agent, --offline) that differ from its frozen dsbuild.yaml are refused,
    listed, unless --reconfigure.
    """
    build, recipe = build_and_recipe(build, recipe, out)
    if until is not None and stages.find(until) is None:
        raise click.BadParameter(f"no stage {until!r} (stages: {', '.join(stages.names())})",
                                 param_hint="--until")
    run_pipeline(recipe, build, offline=offline, per_agent=per_agent, until=until,
                 echo=click.echo, executor=executor, sets=sets, reconfigure=reconfigure)


def build_and_recipe(build: str | None, recipe: str | None, out: str | None
                     ) -> tuple[str, str | None]:
    """BUILD and the recipe from ``run BUILD [--recipe FILE]``, or from the old form ``run
    [RECIPE] --out BUILD`` (its positional is the recipe), which prints the notice."""
    if out is None:
        if build is None:
            raise click.UsageError("Missing argument 'BUILD' (the build folder: `dsbuild run "
                                   "BUILD [--recipe FILE]`).")
        return build, recipe
    notice("`dsbuild run [RECIPE] --out BUILD`", "`dsbuild run BUILD [--recipe RECIPE]`")
    if build is not None and recipe is not None and build != recipe:
        raise click.UsageError(f"the recipe is given twice ({build} before --out, and "
                               f"--recipe {recipe}); give `dsbuild run {out} --recipe FILE`")
    return out, recipe or build
