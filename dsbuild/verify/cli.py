"""``dsbuild verify``: a thin click layer over ``dsbuild.verify.stage.run_verify``."""

from __future__ import annotations

import click

from dsbuild.cli.util import build_argument, echo_result, shard_options


@click.command("verify")
@build_argument
@shard_options
def verify_cmd(build, rank, world_size, force, overrides):
    """Check that each kept pair's edit happened, and only where it should: detector checks per
    operation, the near-copy bound and, when enabled, a vision-language judge."""
    from dsbuild.core.build import Build
    from dsbuild.verify.stage import run_verify

    b = Build.open(build)
    result = run_verify(b, rank, world_size, force=force, overrides=overrides)
    echo_result(result)
    st = result.stats
    if st:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(st.get("reasons", {}).items()))
        click.echo(f"  passed {st.get('passed', 0)} of {st.get('pairs', 0)} pairs"
                   + (f" (rejected: {reasons})" if reasons else ""))
    if b.is_complete("verify"):
        click.echo(f"  report: {b.reports_dir / 'verify.md'}, "
                   f"{b.reports_dir / 'verify_rejects.png'}")
    else:
        click.echo("  report: written when every rank is done")
