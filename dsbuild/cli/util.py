"""Shared click options for stage commands."""

from __future__ import annotations

import functools
import inspect

import click

from dsbuild.cli.options import renamed_option, settings_from, settings_options

EXECUTOR_FIELDS = ("executor", "workers", "ray_address", "gpus_per_worker", "shards",
                   "max_retries")


def executor_options(fn):
    """--executor/--workers/--ray-address/--gpus-per-worker/--shards/--max-retries, derived
    from :class:`dsbuild.executors.ExecutorOptions` and passed to the command as one
    ``executor`` argument (an ``ExecutorOptions``); --address is --ray-address's old name."""
    from dsbuild.executors.base import ExecutorOptions

    @renamed_option("--address", "--ray-address", "ray_address", type=str)
    @settings_options(ExecutorOptions, only=EXECUTOR_FIELDS)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = {k: kwargs.pop(k) for k in EXECUTOR_FIELDS}
        kwargs["executor"] = settings_from(ExecutorOptions, given, "executor options")
        return fn(*args, **kwargs)

    return wrapper


def shard_options(fn):
    """--rank/--world-size/--force/--set shared by every stage command, and the executor
    options; a command without an ``executor`` parameter runs one rank in process only."""
    takes_executor = "executor" in inspect.signature(fn).parameters

    @click.option("--rank", type=int, default=0, show_default=True, help="this worker's shard")
    @click.option("--world-size", type=int, default=1, show_default=True, help="number of shards")
    @click.option("--force", is_flag=True, help="recompute this stage even where it is done")
    @click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE",
                  help="change a setting in dsbuild.yaml before running (repeatable)")
    @wait_option
    @executor_options
    @functools.wraps(fn)
    def wrapper(*args, executor, **kwargs):
        if executor.distributed or executor.shards:
            if kwargs.get("rank"):
                raise click.UsageError("--rank runs one shard here; --executor/--workers/"
                                       "--shards run them all: give one or the other")
            ws = kwargs.get("world_size", 1)
            if ws != 1 and executor.shards not in (None, ws):
                raise click.UsageError(f"--world-size {ws} and --shards {executor.shards} "
                                       "disagree")
            if ws != 1:
                executor.shards = ws
            if not takes_executor:
                return _run_command_on(executor, **kwargs)
        if takes_executor:
            kwargs["executor"] = executor
        return fn(*args, **kwargs)

    return wrapper


def _run_command_on(executor, build, force, overrides, rank=0, world_size=1, **other):
    """A stage command that leaves executors to this decorator: open BUILD, save --set, run
    every rank of the command's stage on the executor."""
    from dsbuild.core import stages
    from dsbuild.core.build import Build

    given = [k for k, v in other.items() if v not in (None, False, ())]
    if given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} cannot be combined with "
                               "--executor/--workers/--shards on this command")
    name = click.get_current_context().command.name
    stage = next((st.name for st in stages.all_stages() if st.cli_name == name), name)
    b = Build.open(build)
    save_settings(b, overrides)
    run_all_ranks(b, stage, executor, force)


def save_settings(build, overrides) -> list:
    """Save a command line's ``STAGE.KEY=VALUE`` settings into BUILD/dsbuild.yaml, only once
    they validate, the stages' checks accept them and the models they name can load; on any
    error dsbuild.yaml is left as it was. Returns the settings changed."""
    from dsbuild.models.available import check_models

    return build.update(list(overrides), check=check_models)


def run_all_ranks(build, stage: str, executor, force: bool) -> None:
    """Run every rank of ``stage`` on ``executor`` (what a stage command does when given
    --executor/--workers/--shards) and print what was done."""
    from dsbuild.executors import make_executor

    with make_executor(executor, echo=click.echo) as ex:
        res = ex.run(build, stage, force=force)
    click.echo(f"{stage}: {res.stats.get('summary') or f'{res.records} records'}")
    if not res.skipped and (note := cut_note(build, stage)):
        click.echo(note)
    click.echo(f"  per-rank logs: {build.root / 'logs' / stage}; shards per worker: "
               f"`dsbuild status {build.root}`")


def wait_option(fn, what: str = "this rank"):
    """--wait: when another process is writing the same rank (or ``what``: an output folder),
    wait for it instead of exiting."""

    def set_wait(ctx, param, value):
        from dsbuild.core import locks

        locks.set_wait(value)
        return value

    return click.option("--wait", is_flag=True, expose_value=False, callback=set_wait,
                        help=f"if another process is writing {what}, wait for it instead "
                             "of stopping")(fn)


def build_argument(fn):
    return click.argument("build", type=click.Path(file_okay=False))(fn)


def cut_note(build, stage: str, result=None) -> str | None:
    """The one line about captions the text encoder cut (dsbuild.core.quiet): over the whole
    stage once it is complete, else over ``result``'s rank; None when none was cut."""
    from dsbuild.core.quiet import CUT_STAT, LIMIT_STAT, cut_line, stage_cut

    if result is not None and not build.is_complete(stage):
        st = result.stats or {}
        return cut_line(int(st.get(CUT_STAT) or 0), int(st.get(LIMIT_STAT) or 77))
    return cut_line(*stage_cut(build.markers(stage)))


def echo_result(result) -> None:
    """One line per rank: done, skipped, records."""
    state = "already done (skipped)" if result.skipped else "done"
    click.echo(f"{result.stage} rank {result.rank}/{result.world_size}: {state}, "
               f"{result.records} records")
