"""The gate under GitHub Actions: a Markdown step summary (``$GITHUB_STEP_SUMMARY``) and one
``::error`` workflow command per miss (``::warning`` per baseline key gone from a build).

Pure functions of the report; the command (dsbuild/cli/report.py) decides when to use them.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsbuild.diversity.gate import group_keys, miss_line

TITLE = "diversity gate"


def _escape(text: str, prop: bool = False) -> str:
    """Escape a workflow command's message (or, with ``prop``, a property value)."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def annotations(report: dict) -> list[str]:
    """``::error`` lines, one per miss, and ``::warning`` lines for vanished baseline keys."""
    gate = report.get("gate")
    if not gate:
        return []
    title = _escape(TITLE, prop=True)
    lines = [f"::error title={title}::{_escape(miss_line(m))}" for m in gate["misses"]]
    lines += [f"::warning title={title}::{_escape('baseline keys gone from ' + ln)}"
              for ln in group_keys(gate.get("vanished") or [])]
    return lines


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _bound(r: dict) -> str:
    at_least = r["kind"] == "fail-under" or (r["kind"] == "drop" and r["better"] == "higher")
    return f"{'≥' if at_least else '≤'} {r['bound']:.4g}"


def _value(r: dict) -> str:
    if r["value"] is None:
        return "inf" if r.get("reason", "").startswith("unbounded") else "—"
    return _num(r["value"])


def _result(r: dict) -> str:
    if r["passed"]:
        return "pass"
    why = r.get("reason")
    if why is None and r["kind"] == "drop" and r.get("drop") is not None:
        rel = r.get("drop_rel")
        why = (f"worse by {100 * rel:.1f}%" if r["margin"].endswith("%") and rel is not None
               else f"worse by {r['drop']:.4g}")
    return "**miss**" + (f" ({why})" if why else "")


def _table(rows: list[dict], with_build: bool) -> list[str]:
    head = ["build"] if with_build else []
    head += ["key", "value", "baseline", "bound", "check", "result"]
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---:" if h in ("value", "baseline", "bound") else "---"
                          for h in head) + "|"]
    for r in rows:
        cells = [f"`{r['build']}`"] if with_build else []
        cells += [f"`{r['key']}`", _value(r), _num(r.get("baseline")), _bound(r),
                  f"`{r['rule']}`", _result(r)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def step_summary(report: dict) -> str:
    """The job summary: the gate's verdict, its misses, every check (folded), what was not
    compared, and the overall diversity table."""
    from dsbuild.diversity.report import overall_table

    lines: list[str] = []
    gate = report.get("gate")
    if gate:
        results = report.get("_gate_results") or [{**m, "passed": False}
                                                   for m in gate["misses"]]
        state = "FAILED" if gate["misses"] else "passed"
        lines += [f"### Diversity gate {state}: {len(gate['misses'])} of {gate['checks']} "
                  "checks missed", ""]
        if gate.get("baseline"):
            b = gate["baseline"]
            lines += [f"Against the baseline `{b['path']}` (`--max-drop {b['max_drop']}`): a "
                      "value may not get worse than the baseline's by more than the margin.", ""]
        with_build = len(report["builds"]) > 1
        missed = [r for r in results if not r["passed"]]
        if missed:
            lines += _table(missed, with_build) + [""]
        if results:
            lines += [f"<details><summary>All {len(results)} checks</summary>", ""]
            lines += _table(results, with_build) + ["", "</details>", ""]
        for what, key in (("In the baseline, gone from this build (not compared)", "vanished"),
                          ("New in this build, not in the baseline (not compared)", "new")):
            if gate.get(key):
                lines += [f"{what}:", ""] + [f"- {ln}" for ln in group_keys(gate[key])] + [""]
    else:
        lines += ["### Diversity", ""]
    lines += [overall_table(report).replace("## Overall", "#### Overall", 1)]
    return "\n".join(lines).rstrip() + "\n\n"


def write_step_summary(report: dict, env: dict | None = None) -> Path | None:
    """Append :func:`step_summary` to ``$GITHUB_STEP_SUMMARY`` when it is set (the runner's
    file; appending is how every step adds to it). Returns the path written, if any."""
    path = (os.environ if env is None else env).get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(step_summary(report))
    return Path(path)
