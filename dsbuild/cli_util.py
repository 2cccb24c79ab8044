"""Shared click options for stage commands."""

from __future__ import annotations

import functools

import click


def shard_options(fn):
    """--rank/--world-size/--force/--set shared by every stage command."""

    @click.option("--rank", type=int, default=0, show_default=True, help="this worker's shard")
    @click.option("--world-size", type=int, default=1, show_default=True, help="number of shards")
    @click.option("--force", is_flag=True, help="recompute this stage even where it is done")
    @click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE",
                  help="change a setting in dsbuild.yaml before running (repeatable)")
    @wait_option
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def wait_option(fn):
    """--wait: when another process is writing the same rank, wait for it instead of exiting."""

    def set_wait(ctx, param, value):
        from dsbuild import locks

        locks.set_wait(value)
        return value

    return click.option("--wait", is_flag=True, expose_value=False, callback=set_wait,
                        help="if another process is writing this rank, wait for it instead "
                             "of stopping")(fn)


def build_argument(fn):
    return click.argument("build", type=click.Path(file_okay=False))(fn)


def echo_result(result) -> None:
    """One line per rank: done, skipped, records."""
    state = "already done (skipped)" if result.skipped else "done"
    click.echo(f"{result.stage} rank {result.rank}/{result.world_size}: {state}, "
               f"{result.records} records")
