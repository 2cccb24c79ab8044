"""The ``dsbuild`` command: a thin click layer over the Python API.

Subcommands are imported lazily, so ``dsbuild status`` never imports torch. Stage commands
come from the stage declarations (:mod:`dsbuild.core.stages`; derived by
:mod:`dsbuild.cli.stage` unless a stage names its own); the others are listed in
``COMMANDS`` below as ``module:attribute`` with the extra they need. A command whose extra
is not installed exits 2 with the ``pip install 'dsbuild[extra]'`` line when it is built,
before any work (:mod:`dsbuild.core.deps`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dsbuild import __version__
from dsbuild.core import deprecation, deps, quiet, stages
from dsbuild.core.errors import DsbuildError

# commands that are not stages: name -> (module:attribute, help, extra)
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "init": ("dsbuild.cli:init_cmd", "create a build directory from a recipe", None),
    "status": ("dsbuild.cli:status_cmd", "show each stage: records, done ranks, what is left",
               None),
    "push": ("dsbuild.cli.export:push_cmd", "push an export to the Hugging Face Hub", "export"),
    "run": ("dsbuild.cli.run:run_cmd", "run every stage end to end", None),
    "repair": ("dsbuild.cli:repair_cmd", "keep the intact records of damaged shards", None),
    "inspect": ("dsbuild.cli.inspect:inspect_cmd", "curate pairs in FiftyOne",
                "fiftyone"),
    "review": ("dsbuild.cli.review:review_group", "human review in Label Studio",
               "review"),
    "bench": ("dsbuild.cli.bench:bench_group", "benchmarks against the plain libraries", None),
    "train": ("dsbuild.cli.train:train_cmd", "fine-tune InstructPix2Pix on an export", "train"),
    "eval": ("dsbuild.cli.evaluate:eval_cmd", "edit a test split with models and compare them",
             "train"),
    "edit": ("dsbuild.cli.evaluate:edit_cmd", "edit one image by an instruction", "train"),
    "tree": ("dsbuild.cli.tree:tree_cmd", "draw a build's sessions as design-tree pages", None),
    "train-generator": ("dsbuild.cli.train:train_generator_cmd",
                        "tune the SD generator on your photos (DreamBooth / LoRA)", "train"),
    "eval-generator": ("dsbuild.cli.evaluate:eval_generator_cmd",
                       "score a tuned generator against its base", "train"),
}


# built-in stages whose command is written here, in the cli layer, rather than derived
STAGE_COMMANDS = {"export": "dsbuild.cli.export:export_cmd",
                  "diversity": "dsbuild.cli.report:report_group"}


def all_commands() -> dict[str, tuple[str | stages.Stage, str, str | None]]:
    """Every top-level command: the ones above plus one per stage declaration (a plugin's own
    ``module:attribute``, a built-in's in ``STAGE_COMMANDS``, or the stage itself where the
    command is derived)."""
    out = dict(COMMANDS)
    for st in stages.all_stages():
        out[st.cli_name] = (st.command or STAGE_COMMANDS.get(st.name) or st, st.help, st.extra)
    return out


def load_command(name: str, target: str | stages.Stage, extra: str | None = None
                 ) -> click.Command:
    """Build command ``name``: its extra must be installed (else the pip line)."""
    deps.check(extra, what=f"dsbuild {name}")
    if isinstance(target, stages.Stage):
        from dsbuild.cli.stage import stage_command

        return stage_command(target)
    return deps.load_target(target, what=f"dsbuild {name}")


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used.

    ``lazy`` maps a name to ``(module:attribute or Stage, help[, extra])``, or is a callable that
    returns such a mapping (so stages registered later still show up)."""

    def __init__(self, *args, lazy=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = lazy or {}

    @property
    def lazy(self) -> dict:
        return self._lazy() if callable(self._lazy) else self._lazy

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        lazy = self.lazy
        if name in lazy:
            target, _, *extra = lazy[name]
            try:
                return load_command(name, target, extra[0] if extra else None)
            except DsbuildError:
                if ctx.resilient_parsing or name not in (ctx.protected_args or [name]):
                    return None
                raise
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = [(name, entry[1]) for name, entry in sorted(self.lazy.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy=all_commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dsbuild")
def cli():
    """dsbuild: build context-specific datasets for instruction-based image editing."""
    deprecation.reset()  # each command prints an old name's notice once
    quiet.install()  # the library messages dsbuild hides, and bars off where nobody watches


@click.command("init")
@click.argument("build", type=click.Path(file_okay=False))
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="recipe YAML (default: the built-in interior-design recipe)")
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE",
              help="stage setting to freeze into dsbuild.yaml (repeatable)")
@click.option("--force", is_flag=True, help="overwrite an existing dsbuild.yaml")
def init_cmd(build, recipe, overrides, force):
    """Create BUILD with a frozen dsbuild.yaml from RECIPE; nothing is written if it is invalid
    or a model it names cannot load."""
    from dsbuild.core.build import Build
    from dsbuild.core.config import default_recipe_path, load_recipe
    from dsbuild.models.available import check_models

    recipe_path = recipe or str(default_recipe_path())
    r = load_recipe(recipe_path)
    b = Build.init(build, r, recipe_path=str(recipe_path), overrides=overrides, exist_ok=force,
                   check=check_models)
    click.echo(f"created {b.root}/dsbuild.yaml: recipe '{r.name}', {len(r.agents)} agents, "
               f"{target_triples(b)}")


def target_triples(b) -> str:
    """"N target triples", counted as captions will (count_scale and per_agent applied),
    with what capped or scaled the recipe's own counts."""
    from dsbuild.captions.stage import agent_target

    s = b.config.captions
    n = sum(agent_target(a, s) for a in b.recipe.agents)
    asked = sum(a.count for a in b.recipe.agents)
    if n == asked:
        return f"{n} target triples"
    how = ([f"captions.count_scale={s.count_scale:g}"] if s.count_scale != 1 else []) \
        + ([f"captions.per_agent={s.per_agent}"] if s.per_agent else [])
    return f"{n} target triples ({', '.join(how)}; the recipe's counts add up to {asked})"


@click.command("status")
@click.argument("build", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--plot", "plot_to", type=click.Path(dir_okay=False), default=None,
              help="also draw the survival funnel into this PNG")
def status_cmd(build, as_json, plot_to):
    """Show each stage of BUILD: records, done ranks, what is left, decisions so far, the
    survival funnel (where pairs drop out) and the next command to run."""
    from dsbuild.core import funnel as F
    from dsbuild.core.build import Build

    b = Build.open(build)
    st = b.status()
    for s in st["stages"].values():
        s["state"] = stage_state(s)
    try:
        st["funnel"] = F.funnel(b)
    except DsbuildError as exc:  # a damaged shard: the stages above name it and its repair
        st["funnel"] = {"error": str(exc).splitlines()[0], "steps": [], "next": None}
    if plot_to and st["funnel"]["steps"]:
        F.plot(st["funnel"], Path(plot_to))
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"build {st['build']} (recipe {st['recipe']})")
    for stage, s in st["stages"].items():
        state = s["state"]
        extra = f", in progress: {', '.join(s['in_progress'])}" if s["in_progress"] else ""
        click.echo(f"  {stage:<9} {state:<34} records={s['records']:<7} "
                   f"ranks={len(s['done_ranks'])}/{s['world_size'] or '-'} "
                   f"sig={s['signature']}{extra}")
        if len(s.get("workers", {})) > 1 or any(not w.startswith("main@")
                                                for w in s.get("workers", {})):
            per = ", ".join(f"{w}: {n}" for w, n in s["workers"].items())
            click.echo(f"  {'':<9} shards per worker: {per}")
    for stage, s in st["stages"].items():
        for rank, why in s["damaged"].items():
            click.echo(f"  {stage} rank {rank}: {why}; repair with `dsbuild repair {build} "
                       f"{stage}`", err=True)
    if st["decisions"]:
        dec = ", ".join(f"{k}={v}" for k, v in sorted(st["decisions"].items()))
        click.echo(f"  decisions {dec}")
    for tool, a in st.get("agreement", {}).items():
        click.echo(f"  agreement {tool}: {a['agreement']:.2f} over {a['pairs']} pairs with "
                   f"several reviewers, {a['disagree']} disagree")
    if st["reports"]:
        click.echo(f"  reports   {', '.join(st['reports'])}")
    f = st["funnel"]
    if f.get("error"):
        click.echo(f"funnel: not counted ({f['error']})")
        return
    click.echo("funnel (pairs; share of the step before)")
    for line in F.table(f):
        click.echo(f"  {line}")
    if f["aside"]["judge_missing"]:
        click.echo(f"  ({f['aside']['judge_missing']} judge scores missing: counted as passing "
                   "the judge, never as 0)")
    if plot_to:
        click.echo(f"funnel plot: {plot_to}")
    click.echo(f"next: {f['next']}")


def stage_state(s: dict) -> str:
    """One stage's state in words, from its ``Build.status`` entry (text and --json alike)."""
    if s["damaged"]:
        return f"DAMAGED ranks {sorted(int(r) for r in s['damaged'])}"
    if s["world_size"] is None and s["committed"]:
        return "committed, marker pending — the next run finishes it"
    if s["world_size"] is None and s["in_progress"]:
        return "in progress"
    if s["world_size"] is None and s.get("stale"):
        old = s["stale"]
        return (f"stale ({old['records']} records from an earlier run; `{old['refresh']}` to "
                "refresh)")
    if s["world_size"] is None and not s.get("active", True):
        return "off (not configured)"
    if s["world_size"] is None:
        return "not run"
    if s["complete"]:
        return "complete"
    state = f"incomplete, missing ranks {s['missing_ranks']}"
    if s["committed"]:
        state += (f" (ranks {s['committed']} committed, marker pending — the next run "
                  "finishes them)")
    return state


@click.command("repair")
@click.argument("build", type=click.Path(file_okay=False))
@click.argument("stage")
@click.option("--rank", "ranks", type=int, multiple=True,
              help="repair these ranks even if they look intact (default: the damaged ones)")
def repair_cmd(build, stage, ranks):
    """Turn STAGE's damaged shards in BUILD back into partial ones, keeping intact records.

    A committed shard with a torn or bad line, or with another record count than its
    completion marker, loses its marker; its intact records become the rank's partial shard,
    so the next run of the stage redoes only what was lost.
    """
    from dsbuild.core.build import Build

    b = Build.open(build)
    done = b.repair(stage, list(ranks) or None)
    if not done:
        click.echo(f"{stage}: every committed shard matches its marker; nothing to repair")
        return
    for rank, r in done.items():
        click.echo(f"{stage} rank {rank}: {r['why']}; kept {r['kept']} intact records, dropped "
                   f"{r['dropped']} bad lines")
    click.echo(f"now run `{b.command_of(stage)}` to redo the rest")


def main(argv: list[str] | None = None) -> None:
    try:
        rc = cli.main(args=argv, prog_name="dsbuild", standalone_mode=False)
        if isinstance(rc, int) and not isinstance(rc, bool) and rc:
            sys.exit(rc)  # non-standalone click returns ctx.exit(n) / Exit(n) codes
    except DsbuildError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:  # an optional dependency imported deep in a command
        if (exc.name or "").split(".")[0] in ("dsbuild", ""):
            raise
        err = deps.missing(exc.name)
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
