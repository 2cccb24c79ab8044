"""The filter report: pass rates per threshold and per agent, score summaries, histograms.

Writes ``reports/filter.json`` (everything), ``filter.md`` (a table per agent),
``filter.png`` (one histogram per score with its threshold drawn as a red line) and
``filter_agents.png`` (pass rate per threshold and keep rate, per agent).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from dsbuild.core import join, sessions
from dsbuild.core.build import Build
from dsbuild.core.records import write_figure, write_json, write_text
from dsbuild.core.schema import SCORE_KEYS
from dsbuild.filter.settings import THRESHOLDS, threshold_off


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def _pass_table(rows: list[dict], limits: dict[str, float]) -> dict:
    """Pairs, scored, kept and per-threshold pass counts/rates for a set of score records."""
    scored = [r for r in rows if r.get("clip_sim_dir") is not None]
    table: dict = {"pairs": len(rows), "scored": len(scored),
                   "image_errors": len(rows) - len(scored),
                   "kept": sum(bool(r.get("keep")) for r in rows)}
    table["keep_rate"] = _rate(table["kept"], len(rows))
    table["thresholds"] = {}
    for name, lim in limits.items():
        vals = [r.get(name) for r in scored if r.get(name) is not None]
        n = sum(v >= lim for v in vals)
        table["thresholds"][name] = {"min": lim, "active": not threshold_off(lim), "pass": n,
                                     "rate": _rate(n, len(vals))}
    passed_all = sum(r.get("rank") is not None for r in scored)
    table["passed_all_thresholds"] = passed_all
    table["passed_all_rate"] = _rate(passed_all, len(scored))
    table["dropped_by_top_k"] = sum(r.get("reason") == "top_k" for r in rows)
    return table


def filter_report(build: Build, rows: list[join.Joined] | None = None) -> dict:
    """The report as a dict: settings, overall and per-agent pass rates, reasons, summaries.

    ``rows``: the scored pairs (``join.scored_pairs``), read from the build when not given."""
    s = build.config.filter
    rows = list(join.scored_pairs(build)) if rows is None else rows
    scores = [j.score for j in rows]
    limits = {name: getattr(s, name) for name in THRESHOLDS}
    if s.dino_min is not None:
        limits["dino"] = s.dino_min
    by_agent: dict[str, list[dict]] = {}
    reasons: dict[str, int] = {}
    for j in rows:
        r = j.score
        by_agent.setdefault(j.triple.get("agent", "?"), []).append(r)
        reason = (r.get("reason") or "kept").split(":")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    summary = {}
    for name in SCORE_KEYS:
        vals = [r[name] for r in scores if r.get(name) is not None]
        if vals:
            summary[name] = {"mean": round(statistics.fmean(vals), 4),
                             "median": round(statistics.median(vals), 4),
                             "min": round(min(vals), 4), "max": round(max(vals), 4)}
    return {
        "settings": {"clip_model": s.clip_model, "clip_pretrained": s.clip_pretrained,
                     "dino": s.dino, "dino_model": s.dino_model if s.dino else None,
                     "thresholds": limits, "top_k": s.top_k,
                     # a minimum of -1 or less passes every pair: listed as off, not as a test
                     "active_thresholds": [n for n, v in limits.items() if not threshold_off(v)],
                     "off_thresholds": [n for n, v in limits.items() if threshold_off(v)]},
        "overall": _pass_table(scores, limits),
        "per_agent": {a: _pass_table(rows, limits) for a, rows in sorted(by_agent.items())},
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "scores": summary,
        "triples_with_kept_pairs": len({r.get("triple_id") for r in scores if r.get("keep")}),
        **session_part(build, rows),
    }


def session_part(build: Build, rows: list[join.Joined]) -> dict:
    """``sessions``: what the captions hold (sessions, turns, branch points) and the session
    runs of each length that the filter leaves (per cut mode), per turn too; nothing for a
    build without sessions."""
    keep = {j.pair["id"]: bool(j.score.get("keep")) for j in rows}
    surv = sessions.survival([j.pair for j in rows], lambda p: keep[p["id"]])
    counts = sessions.tree_counts(build.records("captions", require=False))
    if not surv and not counts["sessions"]:
        return {}
    return {"sessions": {"captions": counts, "cut": _cut_mode(build), **surv}}


def _cut_mode(build: Build) -> str:
    return getattr(build.config.export, "session_cut", "prefix")


def plot_histograms(scores: list[dict], limits: dict[str, float], path: Path) -> None:
    """One histogram per score with the threshold drawn; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SCORE_KEYS if any(r.get(n) is not None for r in scores)] or list(THRESHOLDS)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        vals = [r[name] for r in scores if r.get(name) is not None]
        # bins over the drawn range (data and threshold), so a narrow cluster far from the
        # threshold is still a visible bar rather than 40 slivers
        span = vals + ([limits[name]] if name in limits and not threshold_off(limits[name])
                       else [])
        lo, hi = (min(span), max(span)) if span else (0.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.05, hi + 0.05
        ax.hist(vals, bins=[lo + (hi - lo) * i / 40 for i in range(41)], color="#4c72b0")
        if name in limits and threshold_off(limits[name]):
            ax.set_title(f"{name}\nthreshold off", fontsize=10)
        elif name in limits:
            lim = limits[name]
            rate = _rate(sum(v >= lim for v in vals), len(vals))
            ax.axvline(lim, color="red", linestyle="--", label=f"min {lim}")
            ax.set_title(f"{name}\npass {rate:.0%}" if rate is not None else name, fontsize=10)
            ax.legend(fontsize=8)
        else:
            ax.set_title(f"{name}\nno threshold", fontsize=10)
        ax.set_xlabel("cosine (raw)")
    axes[0][0].set_ylabel("pairs")
    fig.suptitle("filter: scores per pair (red dashes: the minimum kept)", fontsize=10)
    fig.tight_layout()
    write_figure(path, fig)


def plot_agents(rep: dict, path: Path) -> None:
    """Pass rate of each threshold, and keep rate, per agent (grouped bars); saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(rep["per_agent"])
    cols = [n for n, v in rep["settings"]["thresholds"].items() if not threshold_off(v)]
    cols.append("kept")  # thresholds that are off pass every pair: not drawn
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.7 * len(agents))), 4.2))
    width = 0.8 / len(cols)
    for j, col in enumerate(cols):
        vals = []
        for a in agents:
            t = rep["per_agent"][a]
            v = t["keep_rate"] if col == "kept" else t["thresholds"][col]["rate"]
            vals.append(v or 0.0)
        ax.bar([i + j * width for i in range(len(agents))], vals, width, label=col)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(agents))], agents, rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("share of the agent's pairs")
    ax.set_title("filter: pass rate per threshold (those on) and keep rate, per agent",
                 fontsize=10)
    ax.legend(fontsize=7, ncol=len(cols), loc="upper center")
    fig.tight_layout()
    write_figure(path, fig)


def _thresholds_line(settings: dict) -> str:
    """The keep rule as it was applied: the thresholds in force, those off, then top-k."""
    limits, off = settings["thresholds"], settings.get("off_thresholds", [])
    active = [f"{n} ≥ {limits[n]:g}" for n in limits if n not in off]
    why = "a minimum of -1 or less, which every pair passes"
    if not active:
        rule = f"Thresholds: all off ({why})"
    else:
        rule = "Thresholds in force: " + ", ".join(active)
        rule += f"; off ({why}): " + ", ".join(off) if off else ""
    return (f"{rule}. Then the {settings['top_k']} pairs with the highest clip_sim_dir of each "
            "triple are kept.")


def markdown(rep: dict) -> str:
    """A short table per agent for people (the JSON has everything)."""
    settings = rep["settings"]
    names = list(settings["thresholds"])
    off = set(settings.get("off_thresholds", []))
    errors = rep["overall"].get("image_errors", 0)
    heads = [f"{n} off" if n in off else f"{n} ≥ {settings['thresholds'][n]:g}" for n in names]
    lines = [f"# Filter report ({settings['clip_model']}, top_k {settings['top_k']})", "",
             _thresholds_line(settings), "",
             "`passed` pairs passed every threshold in force; `kept` are those ranked within "
             "top_k. A threshold's column is the share of scored pairs that pass it"
             + (f" ({errors} pairs had an unreadable image and no scores)" if errors else "")
             + "; `off` where it tests nothing.", "",
             "| agent | pairs | kept | passed | dropped by top_k | " + " | ".join(heads) + " |",
             "|---" * (5 + len(names)) + "|"]
    rows = [("all", rep["overall"])] + list(rep["per_agent"].items())
    for agent, t in rows:
        rates = " | ".join("off" if n in off else "-" if t["thresholds"][n]["rate"] is None
                           else f"{t['thresholds'][n]['rate']:.0%}" for n in names)
        lines.append(f"| {agent} | {t['pairs']} | {t['kept']} | {t['passed_all_thresholds']} | "
                     f"{t['dropped_by_top_k']} | {rates} |")
    kept = rep["reasons"].get("kept", 0)
    dropped = {k: v for k, v in rep["reasons"].items() if k != "kept"}
    lines += ["", f"Kept {kept} of {rep['overall']['pairs']} pairs. Dropped, by first reason: "
              + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none")
              + (" (`top_k`: passed, ranked below the top "
                 f"{settings['top_k']})" if "top_k" in dropped else ""), ""]
    if rep.get("sessions"):
        ses = rep["sessions"]
        lines += ["## Sessions", "",
                  f"Each turn meets the thresholds on its own; top_k counts a session's runs "
                  f"(one seed each), ranked by their mean clip_sim_dir, so the top "
                  f"{settings['top_k']} runs of a session keep their passing turns. A turn "
                  "survives when it is kept and, under `prefix`, its parent turn survives; "
                  "under `whole`, only runs whose every turn is kept survive.", "",
                  *sessions.survival_lines(ses["captions"], ses, ses["cut"])]
    return "\n".join(lines)


def write_report(build: Build, rows: list[join.Joined] | None = None) -> dict:
    """Write reports/filter.{json,md,png} and filter_agents.png; returns the report dict.

    ``rows``: the scored pairs to report on (default: every rank's, once the stage is done; a
    failed rank reports its own)."""
    rows = list(join.scored_pairs(build)) if rows is None else rows
    rep = filter_report(build, rows)
    out = build.reports_dir
    write_json(out / "filter.json", rep)
    write_text(out / "filter.md", markdown(rep))
    plot_histograms([j.score for j in rows], rep["settings"]["thresholds"], out / "filter.png")
    plot_agents(rep, out / "filter_agents.png")
    rep["files"] = [str(out / n) for n in ("filter.json", "filter.md", "filter.png",
                                          "filter_agents.png")]
    return rep


def summary(build: Build, result) -> list[str]:
    """What ``dsbuild filter`` prints after a rank: kept of scored, and the report once
    every rank is done."""
    st, lines = result.stats, []
    if st:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(st.get("reasons", {}).items()))
        s = build.config.filter
        off = [n for n in THRESHOLDS if threshold_off(getattr(s, n))]
        lines.append(f"  kept {st.get('kept', 0)} of {st.get('pairs', 0)} pairs"
                     + (f" (dropped: {reasons})" if reasons else "")
                     + ("; thresholds off, top_k only" if len(off) == len(THRESHOLDS)
                        else f"; off: {', '.join(off)}" if off else ""))
    if build.is_complete("filter"):
        lines.append(f"  report: {build.reports_dir / 'filter.json'}, "
                     f"{build.reports_dir / 'filter.png'}")
    else:
        lines.append("  report: written when every rank is done")
    return lines
