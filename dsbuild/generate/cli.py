"""``dsbuild generate``: a thin layer over ``dsbuild.generate.stage.run_generate``."""

from __future__ import annotations

import click

from dsbuild.cli.util import build_argument, echo_result, run_all_ranks, shard_options


@click.command("generate")
@build_argument
@click.option("--model", default=None, metavar="ID_OR_DIR",
              help="diffusers SD 1.x/2.x folder or Hub id, or 'tiny' (saved as generate.model)")
@shard_options
def generate_cmd(build, model, rank, world_size, force, overrides, executor):
    """Make image pairs for BUILD's caption triples with Prompt-to-Prompt."""
    from dsbuild.core.build import Build
    from dsbuild.generate.stage import check_installed, run_generate

    check_installed()  # before the --set/--model overrides are saved
    b = Build.open(build)
    b.update(list(overrides) + ([f"generate.model={model}"] if model else []))
    if executor.distributed or executor.shards:
        return run_all_ranks(b, "generate", executor, force)
    res = run_generate(b, rank=rank, world_size=world_size, force=force)
    echo_result(res)
    if res.stats.get("pairs_per_s"):
        click.echo(f"  {res.stats['pairs']} pairs from {res.stats['sources']} sources, "
                   f"{res.stats['pairs_per_s']} pairs/s")
    sheet = b.reports_dir / "generate_contact_sheet.png"
    if sheet.exists() and b.is_complete("generate"):
        click.echo(f"  contact sheet: {sheet}")
