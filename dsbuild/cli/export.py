"""``dsbuild export`` and ``dsbuild push``: thin wrappers over export_build / push_export."""

from __future__ import annotations

from pathlib import Path

import click

from dsbuild.cli.options import renamed_option
from dsbuild.cli.util import build_argument, save_settings, wait_option
from dsbuild.core.config import apply_overrides


@click.command("export")
@renamed_option("--to", "--export-dir", "export_dir", type=click.Path(file_okay=False))
@build_argument
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="export folder (default: BUILD/export)")
@click.option("--force", is_flag=True, help="rewrite the export even where it is up to date")
@click.option("--preferences", is_flag=True,
              help="write the preference pairs (chosen, rejected) instead, into --export-dir "
                   "(default there: BUILD/export-preferences)")
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE",
              help="change a setting first, e.g. split.test_ratio=0.2: saved in dsbuild.yaml, "
                   "or, with --export-dir, used for that export only")
@wait_option
def export_cmd(build, export_dir, force, preferences, overrides):
    """Write BUILD's train/test splits as parquet shards with a dataset card.

    Without --export-dir this is the export stage: BUILD/export, skipped when up to date.
    With --export-dir, a one-off export into DIR whose --set settings are not saved, so they
    never change what a later plain `dsbuild export` writes.
    """
    from dsbuild.core.build import Build
    from dsbuild.export.writer import default_export_dir, export_build

    b = Build.open(build)
    if preferences:
        from dsbuild.export.preference_pairs import export_preferences

        b.config = apply_overrides(b.config, overrides)  # this export only, not saved
        res = export_preferences(b, export_dir)
        click.echo(f"preference pairs -> {res['path']}: " + ", ".join(
            f"{k} {v}" for k, v in res["splits"].items()) + "; by reason: " + (", ".join(
            f"{k} {v}" for k, v in sorted(res["reasons"].items())) or "none"))
        return
    if export_dir and Path(export_dir).resolve() != default_export_dir(b).resolve():
        b.config = apply_overrides(b.config, overrides)  # this export only, not saved
    else:
        save_settings(b, overrides)
    res = export_build(b, export_dir, force=force)
    echo_export(res)


def echo_export(res) -> None:
    state = "up to date (skipped)" if res.skipped else "written"
    counts = ", ".join(f"{k} {v['rows']} rows ({v['no_change']} no-change)"
                       for k, v in res.counts.items())
    click.echo(f"export {res.path}: {state}; {counts}")
    if not res.skipped:
        click.echo(f"  load it with: datasets.load_dataset({str(res.path)!r})")


@click.command("push")
@build_argument
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="create the dataset repo as private")
@click.option("--revision", default=None, help="branch to push to (created if missing)")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None,
              help="export folder (default: BUILD/export; exported first if stale)")
def push_cmd(build, repo_id, private, revision, export_dir):
    """Push BUILD's export with its card to the Hub dataset REPO_ID (token: HF_TOKEN or login)."""
    from dsbuild.core.build import Build
    from dsbuild.export.push import push_export

    res = push_export(Build.open(build), repo_id, private=private, revision=revision,
                      export_dir=export_dir)
    click.echo(f"pushed {len(res.files)} files to {res.url} (revision {res.revision}"
               + (f", commit {res.commit[:10]}" if res.commit else "") + ")")
    rev = f", revision={res.revision!r}" if res.revision != "main" else ""
    click.echo(f"  load it with: datasets.load_dataset({res.repo_id!r}{rev})")
