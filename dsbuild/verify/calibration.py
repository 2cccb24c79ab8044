"""``dsbuild report judge``: the judge against the curators' decisions (docs/verify.md,
"Calibration").

Reads the joined rows (``dsbuild.core.join.rows(build, policy="scored")``): the judge's verdict
and scores from verify's records, the decision in force per pair (FiftyOne and Label Studio:
whichever was given last), and also each tool's own decisions. The math is
:mod:`dsbuild.core.agreement`. Writes ``judge.json`` (everything), ``judge.md`` (tables for
people) and ``judge.png`` (per-criterion score histograms of accepted vs rejected pairs, and κ
against the threshold with the current and the best threshold marked) into ``reports/`` or
``out``.
"""

from __future__ import annotations

from pathlib import Path

from dsbuild.core import agreement, join
from dsbuild.core.agreement import PLACES, shown
from dsbuild.core.build import Build
from dsbuild.core.decisions import in_force, read_decisions
from dsbuild.core.errors import DsbuildError
from dsbuild.core.records import write_figure, write_json, write_text

NAMES = ("json", "md", "png")
REVIEW_HINT = ("review pairs in FiftyOne (`dsbuild inspect {b} --launch`, then `dsbuild inspect "
               "{b} --pull`) or Label Studio (`dsbuild review push {b}`, then `dsbuild review "
               "pull {b}`), and run this again")


def calibration(build: Build) -> dict:
    """The report dict; a :class:`DsbuildError` saying what to do when verify has not run, the
    judge did not run, or no pair is both judged and decided."""
    b = build.root
    if not build.is_complete("verify"):
        raise DsbuildError(f"{b}: verify has not run (or is not finished): the judge's scores "
                           f"come from it; run `dsbuild verify {b} --set "
                           "verify.judge.enabled=true` (with the judge's endpoint, "
                           "docs/verify.md)")
    rows, _ = join.rows(build, policy="scored")
    rep = agreement.calibrate(rows)
    n = rep["counts"]
    if not n["judge_ran"]:
        raise DsbuildError(f"{b}: the judge did not run in this build's verify (no pair has a "
                           f"judge record): run `dsbuild verify {b} --set "
                           "verify.judge.enabled=true` (with the judge's endpoint, "
                           "docs/verify.md)")
    if not n["pairs"]:
        raise DsbuildError(f"{b}: no pair is both judged and decided ({n['judged']} judged, "
                           f"{n['decided']} with a curator's verdict, {n['decided_missing']} of "
                           f"those with a missing judge score): " + REVIEW_HINT.format(b=b))
    decisions = read_decisions(build)
    rep["by_tool"] = {}
    for tool in sorted({d["tool"] for d in decisions if d.get("tool")}):
        own = in_force(decisions, tool=tool)
        sub = agreement.calibrate(
            [{**r, "review": (own.get(r["pair_id"]) or {}).get("verdict")} for r in rows])
        rep["by_tool"][tool] = {k: sub[k] for k in ("agreement", "kappa", "confusion")} | {
            "pairs": sub["counts"]["pairs"], "decided_missing": sub["counts"]["decided_missing"]}
    v = build.config.verify.judge
    rep["rubric"] = v.resolved().as_dict() if v.enabled else None
    return rep


def _f(v: float | None, nd: int = PLACES) -> str:
    return shown(v, nd, "—")


def _k(v: float | None) -> str:
    """κ as printed: ``undefined`` where p_e = 1 (:func:`dsbuild.core.agreement.cohen_kappa`)."""
    return shown(v)


def confusion_lines(c: dict) -> list[str]:
    """The 2x2 table as markdown (rows: the judge; columns: the curators)."""
    return ["| judge \\ curators | accept | reject |", "|---|---|---|",
            f"| pass | {c['pass_accept']} | {c['pass_reject']} |",
            f"| reject | {c['reject_accept']} | {c['reject_reject']} |"]


def headline(rep: dict) -> list[str]:
    """The plain lines ``report judge`` prints: κ, agreement, the table, thresholds, counts."""
    n, t = rep["counts"], rep["threshold"]
    kappa = _f(rep["kappa"]) if rep["kappa"] is not None else "undefined (" + \
        agreement.DEGENERATE.split(": ", 1)[1] + ")"
    c = rep["confusion"]
    w = max(len(str(x)) for x in c.values())
    lines = [f"judge vs curators on {n['pairs']} pairs (judged and decided)",
             f"  Cohen's kappa  {kappa}",
             f"  agreement      {_f(rep['agreement'])}",
             "", f"  {'':14}{'accept':>{max(w, 6)}}  {'reject':>{max(w, 6)}}   (curators)",
             f"  judge pass    {c['pass_accept']:>{max(w, 6)}}  {c['pass_reject']:>{max(w, 6)}}",
             f"  judge reject  {c['reject_accept']:>{max(w, 6)}}  "
             f"{c['reject_reject']:>{max(w, 6)}}", "",
             f"  threshold      current {t['current']:g}; best {t['best']:g} (kappa "
             f"{_k(t['best_kappa'])}, agreement {_f(t['best_agreement'])}"
             + (f"; --set verify.judge.threshold={t['best']:g})" if t["best"] != t["current"]
                else ")")
             if t["best"] is not None else f"  threshold      current {t['current']:g}",
             f"  pairs          {n['judged']} judged, {n['decided']} decided, {n['pairs']} both; "
             f"missing judge scores: {n['missing']} ({n['decided_missing']} of them decided)"]
    for tool, s in rep.get("by_tool", {}).items():
        lines.append(f"  {tool + ':':14} kappa {_k(s['kappa'])}, agreement "
                     f"{_f(s['agreement'])} on {s['pairs']} pairs")
    return lines


def markdown(rep: dict) -> str:
    n, t = rep["counts"], rep["threshold"]
    lines = ["# Judge calibration", "",
             "The judge's verdict against the curators' verdict in force per pair (FiftyOne and "
             "Label Studio). Pairs count when the judge scored them and a curator accepted or "
             "rejected them; a missing judge score is counted apart, never as 0.", "",
             f"- pairs: {n['pairs']} (judged {n['judged']}, decided {n['decided']}, decided "
             f"but the judge's score missing {n['decided_missing']}, decided but never judged "
             f"{n['decided_not_judged']})",
             f"- Cohen's κ: {_k(rep['kappa'])}" + (f" ({rep['kappa_note']})"
                                                   if rep["kappa_note"] else ""),
             f"- agreement: {_f(rep['agreement'])} (chance: {_f(rep['expected_agreement'])})",
             f"- threshold on the weighted score: current {t['current']:g}"
             + (f", best {t['best']:g} (κ {_f(t['best_kappa'])}, agreement "
                f"{_f(t['best_agreement'])})" if t["best"] is not None else ""), "",
             "## Confusion table", "", *confusion_lines(rep["confusion"]), ""]
    if rep["missing_reasons"]:
        lines += ["## Missing judge scores (decided pairs)", "", "| reason | pairs |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in rep["missing_reasons"].items()), ""]
    if rep.get("by_tool"):
        lines += ["## Per tool", "", "| tool | pairs | κ | agreement |", "|---|---|---|---|",
                  *(f"| {k} | {s['pairs']} | {_k(s['kappa'])} | {_f(s['agreement'])} |"
                    for k, s in rep["by_tool"].items()), ""]
    lines += ["## Scores of accepted vs rejected pairs", "",
              "| criterion | mean (accepted) | mean (rejected) | pairs (accepted / rejected) |",
              "|---|---|---|---|"]
    for name, d in rep["criteria"].items():
        lines.append(f"| {name} | {_f(d['accept']['mean'], 3)} | {_f(d['reject']['mean'], 3)} "
                     f"| {d['accept']['n']} / {d['reject']['n']} |")
    lines += ["", "## κ by threshold", "", "| threshold | κ | agreement | judge passes |",
              "|---|---|---|---|",
              *(f"| {p['threshold']:g} | {_k(p['kappa'])} | {_f(p['agreement'])} | "
                f"{p['passed']} |" for p in t["curve"]), ""]
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> None:
    """Per-criterion histograms (accepted vs rejected) and κ against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [k for k in rep["criteria"] if k != "weighted"]
    cols = len(names) + 1
    fig, axes = plt.subplots(1, cols, figsize=(3.4 * cols, 3.2), squeeze=False)
    xs = list(range(agreement.BINS))
    for ax, name in zip(axes[0], names, strict=False):
        d = rep["criteria"][name]
        ax.bar([x - 0.2 for x in xs], d["accept"]["hist"], width=0.4, color="#55a868",
               label=f"accepted ({d['accept']['n']})")
        ax.bar([x + 0.2 for x in xs], d["reject"]["hist"], width=0.4, color="#c44e52",
               label=f"rejected ({d['reject']['n']})")
        ax.set_xticks(xs)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("score (0-10)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("pairs")
    ax = axes[0][-1]
    t = rep["threshold"]
    pts = [p for p in t["curve"] if p["kappa"] is not None]
    # κ is a step function of the threshold: over (s_i-1, s_i] it is the κ at score s_i
    ax.plot([p["threshold"] for p in pts], [p["kappa"] for p in pts], marker="o", ms=3,
            color="#4c72b0", drawstyle="steps-pre")
    ax.axvline(t["current"], color="gray", linestyle="--", label=f"current {t['current']:g}")
    if t["best"] is not None:
        ax.axvline(t["best"], color="red", linestyle=":",
                   label=f"best {t['best']:g} (κ {_f(t['best_kappa'])})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold on the weighted score")
    ax.set_ylabel("Cohen's κ")
    ax.set_title(f"κ by threshold ({rep['counts']['pairs']} pairs)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"judge vs curators: κ {_k(rep['kappa'])}, agreement {_f(rep['agreement'])}",
                 fontsize=10)
    fig.tight_layout()
    write_figure(path, fig)


def write_report(build: Build, out: str | Path | None = None) -> tuple[dict, dict[str, Path]]:
    """Compute the calibration and write judge.{json,md,png} (atomically) into ``out`` (default:
    the build's reports/); returns the report and the paths written."""
    rep = calibration(build)
    folder = Path(out) if out is not None else build.reports_dir
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f"judge.{k}" for k in NAMES}
    write_json(paths["json"], rep)
    write_text(paths["md"], markdown(rep))
    plot(rep, paths["png"])
    return rep, paths
