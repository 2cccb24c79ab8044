"""``dsbuild review push|pull|status``: thin click commands over dsbuild.review.labelstudio."""

from __future__ import annotations

import json

import click

URL_HELP = "Label Studio URL (default: last push, review.url, or $LABEL_STUDIO_URL)"


@click.group("review")
def review_group():
    """Human review in Label Studio (token from $LABEL_STUDIO_API_KEY)."""


@review_group.command("push")
@click.argument("build", type=click.Path(file_okay=False))
@click.option("--url", default=None, help=URL_HELP)
@click.option("--project", "title", default=None,
              help="project title (default: review.project_title or 'dsbuild <build>')")
@click.option("--sample", "sample_size", type=click.IntRange(min=1), default=None,
              help="review this many pairs, stratified by review.stratify_by (default: all)")
@click.option("--seed", type=int, default=None, help="sampling seed (default: review.seed)")
@click.option("--policy", type=click.Choice(["kept", "all"]), default="kept", show_default=True,
              help="pairs the filter kept, or every generated pair (all: the whole build, "
                   "as --all-pairs)")
@click.option("--images", type=click.Choice(["upload", "local-files"]), default=None,
              help="how the browser gets images (default: review.images = upload)")
@click.option("--document-root", default=None,
              help="the server's LOCAL_FILES_DOCUMENT_ROOT (local-files only; default: "
                   "$LOCAL_FILES_DOCUMENT_ROOT or /)")
@click.option("--recreate", is_flag=True,
              help="make a new project even if one exists (the old one stays on the "
                   "server; the build points at the new one)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              default=None, help="label config XML (default: label_config/pair_review.xml)")
@click.option("--overlap", type=click.IntRange(min=1), default=None, metavar="N",
              help="reviewers per pair: sets the project's annotations per task (default: "
                   "review.overlap, else the project's own setting, 1 for a new one)")
@click.option("--sessions", type=click.Choice(["session", "pair", "both"]), default=None,
              help="pairs of multi-turn sessions as one task per session run with a verdict "
                   "per turn, per pair, or both (default: review.session_tasks = session)")
@click.option("--all-pairs", "all_pairs", is_flag=True,
              help="push every pair the policy shows, not only the review queue (the pairs "
                   "still headed for the export, most valuable verdict first; default: "
                   "review.queue = export)")
def push_cmd(build, url, title, sample_size, seed, policy, images, document_root, recreate,
             config_path, overlap, sessions, all_pairs):
    """Import BUILD's pairs as tasks, in review-queue order; pairs already in the project
    are skipped."""
    from dsbuild.core.build import Build
    from dsbuild.review.labelstudio import push

    r = push(Build.open(build), url, title=title, sample_size=sample_size, images=images,
             seed=seed, policy=policy, document_root=document_root, recreate=recreate,
             config_path=config_path, overlap=overlap, sessions=sessions,
             queue="all" if all_pairs else None)
    reviewers = f"{r['overlap']} reviewer{'s' if r['overlap'] != 1 else ''} per pair"
    click.echo(f"project {r['project_id']} '{r['title']}': {r['selected']} pairs selected, "
               f"{r['imported']} imported, {r['already_there']} already there "
               f"(images: {r['images']}; {reviewers})")
    click.echo(f"review at {r['project_url']}")
    if "sessions" in r:
        s = r["sessions"]
        click.echo(f"project {s['project_id']} '{s['title']}': {s['runs']} session runs "
                   f"({s['turns']} turns), {s['imported']} imported, {s['updated']} updated, "
                   f"{s['already_there']} already there"
                   + (f", {s['stale']} changed but already reviewed (left as they are)"
                      if s["stale"] else ""))
        click.echo(f"review sessions at {s['project_url']}")


@review_group.command("pull")
@click.argument("build", type=click.Path(file_okay=False))
@click.option("--url", default=None, help=URL_HELP)
def pull_cmd(build, url):
    """Write BUILD's Label Studio annotations into decisions.jsonl (majority verdict)."""
    from dsbuild.core.build import Build
    from dsbuild.review.labelstudio import pull

    r = pull(Build.open(build), url)
    agr = "-" if r["agreement"] is None else f"{r['agreement']:.2f}"
    click.echo(f"project {r['project_id']}: {r['reviewed']}/{r['tasks']} pairs reviewed, "
               f"{r['added']} new decisions"
               + (f" ({r['withdrawn']} withdrawn: annotations gone)" if r["withdrawn"] else "")
               + f", agreement {agr}; report {r['report']}")


@review_group.command("status")
@click.argument("build", type=click.Path(file_okay=False))
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status_cmd(build, url, as_json):
    """Show review progress of BUILD: done, pending, agreement, per agent."""
    from dsbuild.core.build import Build
    from dsbuild.review.labelstudio import status

    st = status(Build.open(build), url)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return

    def line(name, s):
        agr = "-" if s["agreement"] is None else f"{s['agreement']:.2f}"
        return (f"  {name:<16} done {s['done']:>5}/{s['tasks']:<5} pending {s['pending']:>5}  "
                f"accept {s['accept']:>5}  reject {s['reject']:>5}  agreement {agr}")

    click.echo(f"project {st['project_id']} '{st['title']}' at {st['project_url']}")
    click.echo(line("all", st))
    for agent, s in st["per_agent"].items():
        click.echo(line(agent, s))
