"""``dsbuild filter``: a thin click layer over ``dsbuild.filter.stage.run_filter``."""

from __future__ import annotations

import click

from dsbuild.cli.util import build_argument, echo_result, run_all_ranks, shard_options


@click.command("filter")
@build_argument
@shard_options
def filter_cmd(build, rank, world_size, force, overrides, executor):
    """Score BUILD's pairs with CLIP (and DINOv2), apply thresholds, keep the top k per triple."""
    from dsbuild.core.build import Build
    from dsbuild.filter.stage import run_filter

    b = Build.open(build)
    if executor.distributed or executor.shards:
        b.update(overrides)
        return run_all_ranks(b, "filter", executor, force)
    result = run_filter(b, rank, world_size, force=force, overrides=overrides)
    echo_result(result)
    st = result.stats
    if st:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(st.get("reasons", {}).items()))
        click.echo(f"  kept {st.get('kept', 0)} of {st.get('pairs', 0)} pairs"
                   + (f" (dropped: {reasons})" if reasons else ""))
    if b.is_complete("filter"):
        click.echo(f"  report: {b.reports_dir / 'filter.json'}, {b.reports_dir / 'filter.png'}")
    else:
        click.echo("  report: written when every rank is done")
