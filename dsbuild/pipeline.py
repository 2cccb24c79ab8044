"""``dsbuild run``: every stage end to end, each resuming where it stopped.

captions → generate → filter → augment → diversity report → export. Each stage is its own
module's Python API, imported here by name; a stage whose module is not installed yet is
skipped with a message (and so is what needs its output). ``--offline`` freezes a demo-sized
build into dsbuild.yaml: template captions, the built-in tiny models, a few triples per agent
and a few small samples each, so the whole run needs no network and finishes in minutes on a
laptop. Tiny models make placeholder images; the run says so.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from dsbuild.build import Build
from dsbuild.config import default_recipe_path, load_recipe
from dsbuild.errors import DsbuildError, MissingDependency
from dsbuild.hashing import signature
from dsbuild.records import write_json

# stage -> (module, function, stages whose output it needs, extra that installs its imports)
STAGE_APIS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "captions": ("dsbuild.captions.stage", "run_captions", (), "llm"),
    "generate": ("dsbuild.generate.stage", "run_generate", ("captions",), "gen"),
    "filter": ("dsbuild.filter.stage", "run_filter", ("generate",), "filter"),
    "augment": ("dsbuild.augment.stage", "run_augment", ("filter",), "llm"),
    "diversity": ("dsbuild.report.diversity", "run_report", ("captions",), "diversity"),
    "export": ("dsbuild.export.writer", "export_build", ("filter",), "export"),
}

DEMO_TRIPLES_PER_AGENT = 2
OFFLINE_SETTINGS: tuple[str, ...] = (
    "captions.backend=template",
    "generate.model=tiny", "generate.steps=4", "generate.height=64", "generate.width=64",
    "generate.limit=2",
    "filter.clip_model=tiny", "filter.clip_pretrained=none", "filter.dino=false",
    # tiny CLIP scores are noise: thresholds off, top-k still applies
    "filter.clip_sim_0=-1", "filter.clip_sim_1=-1", "filter.clip_sim_dir=-1",
    "filter.clip_sim_image=-1",
)
OFFLINE_NOTE = ("offline: template captions and dsbuild's built-in tiny models with random "
                "weights. Tiny models make PLACEHOLDER images (noise), not real pictures, and "
                "their CLIP scores mean nothing (filter thresholds are off). Use a real SD "
                "checkpoint (generate.model) and CLIP model (filter.clip_model) for real data.")


@dataclass
class StageOutcome:
    stage: str
    state: str  # done | skipped (up to date) | blocked
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


def stage_api(stage: str) -> Callable:
    """The stage's Python function; a missing optional dependency fails with its pip line."""
    module, attr, _, extra = STAGE_APIS[stage]
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("dsbuild"):
            raise
        raise MissingDependency(
            f"stage {stage} needs {exc.name}, which could not be imported.\n"
            f"  Install it with: pip install 'dsbuild[{extra}]'") from exc


def run_settings(offline: bool, limit: int | None) -> list[str]:
    """The overrides a run freezes into dsbuild.yaml."""
    out = list(OFFLINE_SETTINGS) if offline else []
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


def _diversity_stamp(build: Build) -> Path:
    return build.cache_dir / "run-diversity.json"


def _run_diversity(build: Build, fn: Callable) -> StageOutcome:
    sig = signature({"captions": build.signature("captions"),
                     "settings": build.config.diversity.signature_dict()})
    stamp = _diversity_stamp(build)
    md = build.reports_dir / "diversity.md"
    if stamp.exists() and md.exists() and \
            json.loads(stamp.read_text()).get("signature") == sig:
        return StageOutcome("diversity", "skipped", "up to date")
    fn([build.root])
    write_json(stamp, {"signature": sig})
    return StageOutcome("diversity", "done", f"{md.relative_to(build.root)}")


def run_pipeline(recipe: str | Path | None, out: str | Path, *, offline: bool = False,
                 limit: int | None = None, echo: Callable[[str], None] = print) -> RunResult:
    """Run every stage on BUILD (created from RECIPE if new); returns what each stage did."""
    overrides = run_settings(offline, limit)
    if offline:
        echo(OFFLINE_NOTE)
    build = open_or_init(recipe, out, overrides)
    result = RunResult(build)
    finished: set[str] = set()
    for stage, (_, _, needs, _) in STAGE_APIS.items():
        fn = stage_api(stage)
        t0 = time.perf_counter()
        if any(n not in finished for n in needs):
            missing = ", ".join(n for n in needs if n not in finished)
            o = StageOutcome(stage, "blocked", f"skipped: needs {missing}")
        elif stage == "diversity":
            o = _run_diversity(build, fn)
        elif stage == "export":
            res = fn(build)
            result.export_path = res.path
            rows = ", ".join(f"{k} {v['rows']}" for k, v in res.counts.items())
            o = StageOutcome(stage, "skipped" if res.skipped else "done",
                             f"{res.path} ({rows} rows)")
        else:
            res = fn(build, 0, 1)
            o = StageOutcome(stage, "skipped" if res.skipped else "done",
                             f"{res.records} records")
        o.seconds = time.perf_counter() - t0
        if o.state in ("done", "skipped"):
            finished.add(stage)
        result.outcomes.append(o)
        echo(f"{stage:<9} {_label(o):<24} {o.detail}" + (f"  [{o.seconds:.1f}s]"
                                                         if o.state == "done" else ""))
    if result.did_nothing:
        echo("nothing to do: every stage is up to date")
    if result.export_path:
        echo(f"load it with: datasets.load_dataset({str(result.export_path)!r})")
    return result


def _label(o: StageOutcome) -> str:
    return {"done": "done", "skipped": "up to date (skipped)", "blocked": "skipped"}[o.state]


@click.command("run")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="build directory (created, or reused and resumed)")
@click.option("--offline", is_flag=True,
              help="template captions + built-in tiny models, demo size; no network")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="caption triples per agent (offline default: "
                   f"{DEMO_TRIPLES_PER_AGENT})")
def run_cmd(recipe, out, offline, limit):
    """Run captions → generate → filter → augment → diversity → export on RECIPE into BUILD.

    RECIPE defaults to the built-in interior-design recipe. Each stage resumes where it
    stopped; a second run with the same settings does nothing.
    """
    run_pipeline(recipe, out, offline=offline, limit=limit, echo=click.echo)
