"""``dsbuild inspect BUILD``: a thin click command over dsbuild.review.fiftyone."""

from __future__ import annotations

import signal
import time

import click

from dsbuild.cli.options import renamed_option


@click.command("inspect")
@renamed_option("--address", "--host", "host", type=str)
@click.argument("build", type=click.Path(file_okay=False))
@click.option("--name", default=None,
              help="FiftyOne dataset (default: review.dataset_name or dsbuild-<build>)")
@click.option("--pull", is_flag=True,
              help="write the curators' tags (accept/reject, other tags = reasons) as decisions")
@click.option("--reviewer", default=None, help="whose tags --pull reads: each reviewer holds "
              "their own verdicts (default: fiftyone)")
@click.option("--launch", is_flag=True, help="start the App and wait until Ctrl-C")
@click.option("--port", type=int, default=None, help="App port (default: FiftyOne's, 5151)")
@click.option("--host", default=None, help="App host to serve on (default: localhost; "
              "0.0.0.0: every interface)")
@click.option("--remote", is_flag=True, help="serve the App without opening a browser here")
def inspect_cmd(build, name, pull, reviewer, launch, port, host, remote):
    """Build or update BUILD's FiftyOne dataset; --launch opens the App, --pull reads tags."""
    from dsbuild.core.build import Build
    from dsbuild.review import fiftyone as fo_review

    b = Build.open(build)
    if pull:
        r = fo_review.pull(b, name, reviewer=reviewer)
        click.echo(f"dataset '{r['name']}': {r['tagged_pairs']} tagged pairs, "
                   f"{r['decisions']} decisions {r['verdicts']}, {r['added']} new in "
                   f"{b.decisions_path}"
                   + (f" ({r['withdrawn']} withdrawn: verdict tag removed)"
                      if r["withdrawn"] else ""))
        if r["conflicting"]:
            click.echo(f"  {len(r['conflicting'])} pairs tagged both accept and reject "
                       f"(skipped): {', '.join(r['conflicting'][:5])}")
        if r["no_verdict"]:
            click.echo(f"  {len(r['no_verdict'])} pairs have tags but neither accept nor "
                       f"reject (skipped): {', '.join(r['no_verdict'][:5])}")
    else:
        r = fo_review.build_dataset(b, name)
        scored = "" if r["scored"] else " (filter not complete: score fields are empty)"
        # the App's header counts groups: one per pair, no-change sample or pair gone since
        gone = r["groups"] - r["pairs"] - r["no_change"]
        groups = f"{r['pairs']} pairs" if r["groups"] == r["pairs"] else (
            f"{r['groups']} groups ({r['pairs']} pairs, {r['no_change']} no-change samples"
            + (f", {gone} no longer in the build" if gone > 0 else "") + ")")
        click.echo(f"dataset '{r['name']}': {groups} (slices "
                   f"{', '.join(r['slices'])}; {r['samples']} samples in all); "
                   f"{r['added_pairs']} pairs added, {r['updated_samples']} samples updated"
                   f"{scored}")
        click.echo(f"  pair tiles: {r['tiles']['rendered']} rendered, {r['tiles']['cached']} "
                   f"cached; plugin @dsbuild/review registered at {r['plugin']}")
        if r["stale_samples"]:
            click.echo(f"  {r['stale_samples']} samples are no longer in the build "
                       "(in_build=False; their tags are kept)")
        if r["augment_skipped"]:
            click.echo(f"  {r['augment_skipped']} augment records had no images (skipped)")
        if r["missing_images"]:
            click.echo(f"  warning: {len(r['missing_images'])} image files are missing (the App "
                       f"shows them broken), e.g. {r['missing_images'][0]}", err=True)
        click.echo(f"  saved views: {', '.join(r['views'])}")
    if not launch:
        return
    session, url = fo_review.launch(b, name, port=port, address=host, remote=remote)
    click.echo(f"FiftyOne App: {url}  (Ctrl-C to stop)")
    # Ctrl-C and SIGTERM both close the App (a shell's background jobs start with SIGINT off)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    click.echo("App stopped")
