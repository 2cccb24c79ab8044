"""The diversity stage: measure every source, gate, write the report, then the marker."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

from dsbuild.core.errors import DsbuildError
from dsbuild.core.text import TOKENISATION
from dsbuild.diversity.gate import (
    Baseline,
    apply_gate,
    compare_baseline,
    load_baseline,
    margins_text,
    parse_check,
    parse_max_drop,
)
from dsbuild.diversity.measures import FIELD_METRICS, measure_source
from dsbuild.diversity.report import write_reports
from dsbuild.diversity.settings import DiversitySettings
from dsbuild.diversity.sources import load_source, unique_names


def warnings_of(report: dict) -> list[str]:
    """Every note, each naming its build and field; short per-group corpora are summed up."""
    out = []
    for b in report["builds"]:
        out += [f"build '{b['name']}': {n}" for n in b["notes"]]
        for fname, f in b["fields"].items():
            out += [f"build '{b['name']}' field '{fname}': {n}" for n in f["overall"]["notes"]]
            short = []
            for kind in ("agents", "levels"):
                for g, m in f[kind].items():
                    for n in m["notes"]:
                        if "MTLD is not stable" in n:
                            short.append(f"{kind[:-1]} {g} ({m['tokens']})")
                        else:
                            out.append(f"build '{b['name']}' field '{fname}' {kind[:-1]} "
                                       f"'{g}': {n}")
            if short:
                out.append(f"build '{b['name']}' field '{fname}': MTLD is not stable (fewer than "
                           f"{report['settings']['min_tokens_mtld']} tokens) for "
                           f"{', '.join(short)}")
    return out


def baseline_warnings(report: dict, baseline: Baseline) -> list[str]:
    """Lines for what makes a baseline's numbers not comparable with this report's."""
    out = []
    theirs = baseline.report
    if theirs.get("tokenisation") != report["tokenisation"]:
        out.append(f"baseline {baseline.path} was tokenised differently "
                   f"({theirs.get('tokenisation')!r}): its numbers are not comparable")
    for k in ("mtld_threshold",):
        a, b = (theirs.get("settings") or {}).get(k), report["settings"].get(k)
        if a != b:
            out.append(f"baseline {baseline.path} has diversity.{k} = {a}, this report {b}: "
                       "MTLD is not comparable")
    return out


def diversity_report(paths: list[str | Path], *, semantic: bool = False) -> dict:
    """Measure every build/triples file; the first source's settings apply to all of them."""
    if not paths:
        raise DsbuildError("give at least one build directory or triples .jsonl file")
    sources = [load_source(p) for p in paths]
    unique_names(sources)
    settings = sources[0].settings
    scorer = None
    if semantic:
        from dsbuild.diversity.semantic import SemanticScorer

        scorer = SemanticScorer()
    from dsbuild.core.progress import progress

    builds = [measure_source(s, settings, scorer)
              for s in progress(sources, desc="diversity", unit="build")]
    return {
        "version": 1,
        "tokenisation": TOKENISATION,
        "corpus": "a field's values in triple-id order, joined with newlines",
        "settings": settings.model_dump(mode="json"),
        "semantic": semantic,
        "metrics": list(FIELD_METRICS),
        "builds": builds,
        "warnings": [],
        "_reports_dir": str(sources[0].reports_dir),
    }


def run_report(paths: list[str | Path], *, fail_under: Iterable[str] = (),
               fail_over: Iterable[str] = (), out_dir: str | Path | None = None,
               semantic: bool = False, baseline: Baseline | str | Path | None = None,
               max_drop: Iterable[str] = ()) -> tuple[dict, dict[str, Path]]:
    """Measure, gate and write: the Python API behind ``dsbuild report diversity``.

    ``baseline`` (an earlier diversity.json, or its :class:`Baseline`) adds one check per key
    of the report: no value may get worse than the baseline's by more than ``max_drop``
    (``["2%"]`` by default; see :func:`dsbuild.diversity.gate.parse_max_drop`)."""
    settings_fields = list(DiversitySettings().fields)
    checks = [parse_check(s, True, settings_fields) for s in fail_under]
    checks += [parse_check(s, False, settings_fields) for s in fail_over]
    max_drop = list(max_drop)
    if max_drop and baseline is None:
        raise DsbuildError("--max-drop needs --baseline REPORT.json to compare against")
    margins = parse_max_drop(max_drop)
    if baseline is not None and not isinstance(baseline, Baseline):
        baseline = load_baseline(baseline)  # before any work: a bad file is one line, exit 2
    semantic = (semantic or any(c.metric == "semantic" for c in checks)
                or bool(baseline and baseline.report.get("semantic")))
    report = diversity_report(paths, semantic=semantic)
    for c in checks:
        if c.field and c.field not in report["settings"]["fields"]:
            raise DsbuildError(f"{c.key}: field {c.field!r} is not measured "
                               f"(diversity.fields = {report['settings']['fields']})")
    report["warnings"] = warnings_of(report)
    if checks or baseline is not None:
        results = apply_gate(report, checks)
        new: list[dict] = []
        vanished: list[dict] = []
        gate: dict = {"fail_under": list(fail_under), "fail_over": list(fail_over)}
        if baseline is not None:
            report["warnings"] += baseline_warnings(report, baseline)
            more, new, vanished = compare_baseline(report, baseline, margins)
            results += more
            gate["baseline"] = {"path": baseline.path, "max_drop": margins_text(margins),
                                "builds": [b["name"] for b in baseline.report["builds"]]}
        misses = [{k: v for k, v in r.items() if k != "passed"} for r in results
                  if not r["passed"]]
        gate.update(checks=len(results), misses=misses, new=new, vanished=vanished,
                    passed=not misses)
        report["gate"] = gate
        report["_gate_results"] = results  # every check, for the CI step summary
    written = write_reports(report, out_dir)
    return report, written


def run_diversity(build, rank: int = 0, world_size: int = 1, *, force: bool = False,
                  fail_under: Iterable[str] = (), fail_over: Iterable[str] = (),
                  semantic: bool = False, baseline: Baseline | str | Path | None = None,
                  max_drop: Iterable[str] = ()):
    """The diversity stage: BUILD/reports/diversity.{json,md,png} of the build's own triples,
    then its completion marker (what ``dsbuild run`` and the export card read). Returns the
    StageResult; the report itself is ``result.report``."""
    if baseline is not None and not isinstance(baseline, Baseline):
        baseline = load_baseline(baseline)  # a bad file fails before the stage starts

    def work(_) -> dict:
        report, written = run_report([build.root], fail_under=fail_under, fail_over=fail_over,
                                     out_dir=build.reports_dir, semantic=semantic,
                                     baseline=baseline, max_drop=max_drop)
        result.report, result.written = report, written
        overall = report["builds"][0]["fields"]
        mtld = {f: (m.get("overall") or {}).get("mtld") for f, m in overall.items()}
        shown = ", ".join(f"{f} {v:.1f}" for f, v in mtld.items() if v is not None)
        return {"records": report["builds"][0]["records"], "mtld": mtld,
                "summary": f"{written['md'].relative_to(build.root)} (MTLD {shown})"}

    result = SimpleNamespace(report=None, written=None)
    res = build.run_stage("diversity", rank, world_size, work, force=force)
    res.report = result.report
    return res
