"""``dsbuild captions``: thin click layer over dsbuild.captions.stage.run_captions."""

from __future__ import annotations

import click

from dsbuild.cli.util import build_argument, echo_result, run_all_ranks, shard_options


@click.command("captions")
@build_argument
@click.option("--backend", type=click.Choice(["auto", "openai", "template"]), default=None,
              help="where triples come from (saved into dsbuild.yaml; default: the build's "
                   "setting, 'auto' = openai when an endpoint or key is configured)")
@shard_options
def captions_cmd(build, backend, rank, world_size, force, overrides, executor):
    """Write caption triples {input, edit, output} for BUILD with its recipe's agents."""
    from dsbuild.captions.report import format_summary
    from dsbuild.captions.stage import run_captions
    from dsbuild.core.build import Build

    b = Build.open(build)
    if executor.distributed or executor.shards:
        b.update(list(overrides) + ([f"captions.backend={backend}"] if backend else []))
        run_all_ranks(b, "captions", executor, force)
        click.echo(f"report: {b.reports_dir / 'captions.json'}")
        return
    result = run_captions(b, rank, world_size, backend=backend, force=force,
                          overrides=overrides)
    echo_result(result)
    click.echo(format_summary(result.report))
    click.echo(f"report: {b.reports_dir / 'captions.json'}")
