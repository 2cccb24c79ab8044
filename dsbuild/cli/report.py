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
    """Reports over builds (diversity of the caption text, the judge against the curators)."""


def _check_specs(ctx, param, value):
    """Reject an unknown metric or field before any work (usage error, exit 2)."""
    from dsbuild.diversity.gate import parse_check

    for spec in value:
        try:
            parse_check(spec, param.name == "fail_under")
        except DsbuildError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def _max_drop_specs(ctx, param, value):
    """Reject a bad --max-drop before any work (usage error, exit 2)."""
    from dsbuild.diversity.gate import parse_max_drop

    try:
        parse_max_drop(value)
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
@click.option("--baseline", "baseline_path", type=click.Path(dir_okay=True),
              default=None, metavar="REPORT.json",
              help="compare every key (FIELD.METRIC, agent:NAME.FIELD.METRIC, "
                   "level:NAME.FIELD.METRIC) with this earlier diversity.json (e.g. main's): "
                   "exit 1 when one got worse by more than --max-drop")
@click.option("--max-drop", multiple=True, callback=_max_drop_specs, metavar="MARGIN",
              help="how much worse than the baseline a value may get: 2% is relative to the "
                   "baseline's value, a plain number (0.5) is absolute, in the metric's units; "
                   "METRIC=MARGIN sets one metric's (near_dup_rate=0.01); repeatable; "
                   "default 2%. Worse is lower, except for yule_k and near_dup_rate")
@click.option("--semantic", is_flag=True,
              help="add semantic diversity (needs pip install 'dsbuild[semantic]')")
def diversity_cmd(builds, as_json, out_dir, fail_under, fail_over, baseline_path, max_drop,
                  semantic):
    """MTLD, Yule's K, Dugast's U², Guiraud of BUILDS (build dirs or triples .jsonl), side by side.

    Exits 1 when a --fail-under/--fail-over threshold is missed or, with --baseline, a value
    got worse than the baseline's by more than --max-drop (one line per miss). Under GitHub
    Actions it also appends a summary to $GITHUB_STEP_SUMMARY and prints ::error lines.
    """
    from pathlib import Path

    from dsbuild.core.build import CONFIG_NAME, Build
    from dsbuild.diversity.gate import load_baseline
    from dsbuild.diversity.report import overall_table, public
    from dsbuild.diversity.stage import run_diversity, run_report

    if max_drop and baseline_path is None:
        raise click.UsageError("--max-drop needs --baseline REPORT.json")
    # a bad baseline is one line naming the file (exit 2), before any work
    baseline = load_baseline(baseline_path) if baseline_path else None
    first = Path(builds[0])
    if len(builds) == 1 and out_dir is None and (first / CONFIG_NAME).exists():
        # one build into its own reports/: that is the diversity stage (marker and all)
        res = run_diversity(Build.open(first), force=True, fail_under=fail_under,
                            fail_over=fail_over, semantic=semantic, baseline=baseline,
                            max_drop=max_drop)
        report = res.report
        written = {k: first / "reports" / f"diversity.{k}" for k in ("json", "md", "png")}
    else:
        report, written = run_report(list(builds), fail_under=fail_under, fail_over=fail_over,
                                     out_dir=out_dir, semantic=semantic, baseline=baseline,
                                     max_drop=max_drop)
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
        from dsbuild.diversity.gate import group_keys, miss_line

        for line in group_keys(gate.get("vanished") or []):
            click.echo(f"warning: baseline keys gone from {line} (not compared)", err=True)
        for line in group_keys(gate.get("new") or []):
            click.echo(f"diversity gate: not in the baseline, not compared: {line}", err=True)
        for m in gate["misses"]:
            click.echo(miss_line(m), err=True)
        state = "FAILED" if gate["misses"] else "passed"
        against = (f" (against {gate['baseline']['path']}, --max-drop "
                   f"{gate['baseline']['max_drop']})" if gate.get("baseline") else "")
        click.echo(f"diversity gate {state}: {len(gate['misses'])} of {gate['checks']} checks "
                   f"missed{against}", err=True)
    _ci_output(report)
    if gate and gate["misses"]:
        raise click.exceptions.Exit(1)


@report_group.command("judge")
@click.argument("build", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the whole report as JSON")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write judge.{json,md,png} here (default: the build's reports/)")
def judge_cmd(build, as_json, out_dir):
    """The verify judge against the curators' decisions (FiftyOne, Label Studio) on BUILD.

    Cohen's kappa, agreement, the confusion table, per-criterion scores of accepted vs rejected
    pairs and the threshold on the weighted score that would best match the curators. Pairs
    count when the judge scored them and a curator accepted or rejected them; missing judge
    scores are counted apart.
    """
    from dsbuild.core.build import Build
    from dsbuild.verify.calibration import headline, write_report

    rep, written = write_report(Build.open(build), out_dir)
    if as_json:
        click.echo(json.dumps(rep, indent=2, ensure_ascii=False))
    else:
        click.echo("\n".join(headline(rep)))
        click.echo("wrote " + ", ".join(str(p) for p in written.values()))


def _ci_output(report: dict) -> None:
    """Under GitHub Actions: the step summary and one ::error line per miss (on stderr, which
    the runner reads for workflow commands too, so --json keeps stdout clean)."""
    import os

    from dsbuild.diversity.ci import annotations, write_step_summary

    try:
        write_step_summary(report)
    except OSError as exc:
        click.echo(f"warning: could not append to $GITHUB_STEP_SUMMARY: {exc}", err=True)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for line in annotations(report):
            click.echo(line, err=True)
