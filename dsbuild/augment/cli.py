"""``dsbuild augment BUILD``: add no-change samples for a share of the kept pairs."""

from __future__ import annotations

import click

from dsbuild.cli.util import build_argument, echo_result, run_all_ranks, shard_options


@click.command("augment")
@build_argument
@shard_options
def augment_cmd(build, rank, world_size, force, overrides, executor):
    """Add no-change samples to BUILD: instructions naming something absent, output = input."""
    from dsbuild.augment.stage import run_augment
    from dsbuild.core.build import Build

    b = Build.open(build)
    b.update(overrides)
    if executor.distributed or executor.shards:
        return run_all_ranks(b, "augment", executor, force)
    result = run_augment(b, rank, world_size, force=force)
    echo_result(result)
    st = result.stats
    if st and not result.skipped:
        click.echo(f"  {st.get('no_change', 0)} no-change samples from {st.get('kept_pairs', 0)} "
                   f"kept pairs (ratio {st.get('ratio')})")
        llm = st.get("llm")
        if llm:
            rej = ", ".join(f"{k}: {v}" for k, v in llm["rejected"].items()) or "none"
            click.echo(f"  LLM: {llm['sent']} requests, {llm['cached']} from cache; replies "
                       f"replaced by the template: {rej}")
        if st.get("short"):
            click.echo(f"  {st['short']} fewer than asked: their captions mention every "
                       "candidate in the recipe's vocabulary")
