"""``dsbuild report diversity``: the diversity stage's command group (a thin layer over
dsbuild.diversity)."""

from __future__ import annotations

import json

import click

from dsbuild.core.errors import DsbuildError

GATE_HELP = ("metric=value, repeatable; keys: METRIC (every field), FIELD.METRIC (edit.mtld), "
             "agent:NAME.[FIELD.]METRIC or level:NAME.[FIELD.]METRIC (NAME may be *); metrics: "
             "mtld, yule_k, dugast, guiraud, tokens, types, near_dup_rate, semantic")


@click.group("report")
def report_group():
    """Reports over builds (diversity of the caption text)."""


def _check_specs(ctx, param, value):
    """Reject an unknown metric or field before any work (usage error, exit 2)."""
    from dsbuild.diversity.gate import parse_check

    for spec in value:
        try:
            parse_check(spec, param.name == "fail_under")
        except DsbuildError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


@report_group.command("diversity")
@click.argument("builds", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="print the whole report as JSON")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write diversity.{json,md,png} here (default: the first build's reports/)")
@click.option("--fail-under", multiple=True, callback=_check_specs, metavar="METRIC=VALUE",
              help="exit 1 when a value is below this; " + GATE_HELP)
@click.option("--fail-over", multiple=True, callback=_check_specs, metavar="METRIC=VALUE",
              help="exit 1 when a value is above this; " + GATE_HELP)
@click.option("--semantic", is_flag=True,
              help="add semantic diversity (needs pip install 'dsbuild[semantic]')")
def diversity_cmd(builds, as_json, out_dir, fail_under, fail_over, semantic):
    """MTLD, Yule's K, Dugast's U², Guiraud of BUILDS (build dirs or triples .jsonl), side by side.

    Exits 1 when a --fail-under/--fail-over threshold is missed (one line per miss).
    """
    from pathlib import Path

    from dsbuild.core.build import CONFIG_NAME, Build
    from dsbuild.diversity.report import overall_table, public
    from dsbuild.diversity.stage import run_diversity, run_report

    first = Path(builds[0])
    if len(builds) == 1 and out_dir is None and (first / CONFIG_NAME).exists():
        # one build into its own reports/: that is the diversity stage (marker and all)
        res = run_diversity(Build.open(first), force=True, fail_under=fail_under,
                            fail_over=fail_over, semantic=semantic)
        report = res.report
        written = {k: first / "reports" / f"diversity.{k}" for k in ("json", "md", "png")}
    else:
        report, written = run_report(list(builds), fail_under=fail_under, fail_over=fail_over,
                                     out_dir=out_dir, semantic=semantic)
        if out_dir is None and (first / CONFIG_NAME).exists():
            # a side-by-side report replaced the build's own: the stage must run again
            Build.open(first).invalidate("diversity")
    if as_json:
        click.echo(json.dumps(public(report), indent=2, ensure_ascii=False))
    else:
        click.echo(overall_table(report), nl=False)
        click.echo("wrote " + ", ".join(str(p) for p in written.values()))
    for w in report["warnings"]:
        click.echo(f"warning: {w}", err=True)
    gate = report.get("gate")
    if gate:
        for line in gate["misses"]:
            click.echo(line, err=True)
        state = "FAILED" if gate["misses"] else "passed"
        click.echo(f"diversity gate {state}: {len(gate['misses'])} of {gate['checks']} checks "
                   "missed", err=True)
        if gate["misses"]:
            raise click.exceptions.Exit(1)
