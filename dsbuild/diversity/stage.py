"""The diversity stage: measure every source, gate, write the report, then the marker."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

from dsbuild.core.errors import DsbuildError
from dsbuild.core.text import TOKENISATION
from dsbuild.diversity.gate import apply_gate, parse_check
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
               semantic: bool = False) -> tuple[dict, dict[str, Path]]:
    """Measure, gate and write: the Python API behind ``dsbuild report diversity``."""
    settings_fields = list(DiversitySettings().fields)
    checks = [parse_check(s, True, settings_fields) for s in fail_under]
    checks += [parse_check(s, False, settings_fields) for s in fail_over]
    semantic = semantic or any(c.metric == "semantic" for c in checks)
    report = diversity_report(paths, semantic=semantic)
    for c in checks:
        if c.field and c.field not in report["settings"]["fields"]:
            raise DsbuildError(f"{c.key}: field {c.field!r} is not measured "
                               f"(diversity.fields = {report['settings']['fields']})")
    report["warnings"] = warnings_of(report)
    if checks:
        misses, n = apply_gate(report, checks)
        report["gate"] = {"fail_under": list(fail_under), "fail_over": list(fail_over),
                          "checks": n, "misses": misses, "passed": not misses}
    written = write_reports(report, out_dir)
    return report, written


def run_diversity(build, rank: int = 0, world_size: int = 1, *, force: bool = False,
                  fail_under: Iterable[str] = (), fail_over: Iterable[str] = (),
                  semantic: bool = False):
    """The diversity stage: BUILD/reports/diversity.{json,md,png} of the build's own triples,
    then its completion marker (what ``dsbuild run`` and the export card read). Returns the
    StageResult; the report itself is ``result.report``."""

    def work(_) -> dict:
        report, written = run_report([build.root], fail_under=fail_under, fail_over=fail_over,
                                     out_dir=build.reports_dir, semantic=semantic)
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
