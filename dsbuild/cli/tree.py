"""``dsbuild tree``: the design-tree pages of a build's sessions (:mod:`dsbuild.review.tree`)."""

from __future__ import annotations

import click

from dsbuild.cli.util import build_argument


@click.command("tree")
@build_argument
@click.argument("session", required=False)
def tree_cmd(build, session):
    """Draw SESSION of BUILD as a tree (every session, and an index page, without SESSION):
    a self-contained HTML page and a PNG under BUILD/reports/sessions/, one tree per
    generated run, images at the nodes, instructions on the edges, scores on hover, the
    turns that do not survive (export.session_cut) dimmed."""
    from dsbuild.core.build import Build
    from dsbuild.review.tree import INDEX, write_build_trees

    b = Build.open(build)
    pages = write_build_trees(b, session)
    for page in pages:
        click.echo(f"written: {page} and {page.with_suffix('.png').name}")
    if session is None:
        click.echo(f"index: {b.root / INDEX} ({len(pages)} sessions)")
