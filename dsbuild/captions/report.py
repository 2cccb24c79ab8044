"""reports/captions.{json,png}: kept, rejected by reason, per agent, requests and token usage,
and the sessions' counts (sessions, turns, by length, branches, rejected turns by reason).

The report merges the stats every finished rank left in its completion marker, so it is the
same whichever rank finishes last, and a re-run that skips done ranks rewrites it unchanged.
A rank that was killed and resumed reports its counts as if it had run once, and the requests
of all its attempts added up (``requests.attempts`` says how many there were).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dsbuild.captions.sessions import merge as merge_sessions
from dsbuild.captions.validate import REASONS
from dsbuild.core.build import Build
from dsbuild.core.records import write_json

REQUEST_KEYS = ("sent", "cached", "retries", "failed")


def merge_stats(build: Build) -> dict:
    """One report from the stats of every finished rank of the current captions signature."""
    marks = build.markers("captions")
    rejected: Counter = Counter()
    requests: Counter = Counter()
    retry_reasons: Counter = Counter()
    usage: Counter = Counter()
    usage_cached: Counter = Counter()
    grounded: Counter = Counter()
    photos = None
    sessions: list[dict] = []
    agents: dict[str, dict] = {}
    examples: dict[str, list[str]] = {}
    backends, models, short = set(), set(), {}
    has_requests = False
    for rank in sorted(marks):
        st = marks[rank].get("stats") or {}
        rejected.update(st.get("rejected", {}))
        agents.update(st.get("agents", {}))
        short.update(st.get("short", {}))
        if "photos" in st:  # a build with photos: photos written from, grounding outcomes
            photos = (photos or 0) + st["photos"]
            grounded.update(st.get("grounded", {}))
        if "sessions" in st:  # captions.sessions.share > 0
            sessions.append(st["sessions"])
        if st.get("backend"):
            backends.add(st["backend"])
        if st.get("model"):
            models.add(st["model"])
        for reason, lines in (st.get("rejected_examples") or {}).items():
            examples.setdefault(reason, []).extend(lines[: 3 - len(examples.get(reason, []))])
        req = st.get("requests")
        if req:
            has_requests = True
            requests.update({k: req.get(k, 0) for k in REQUEST_KEYS})
            requests["attempts"] += req.get("attempts", 1)
            retry_reasons.update(req.get("retry_reasons", {}))
            usage.update(req.get("usage", {}))
            usage_cached.update(req.get("usage_cached", {}))
    ordered = {a.name: agents[a.name] for a in build.recipe.ordered_agents() if a.name in agents}
    ws = build.stage_world_size("captions")
    return {
        "recipe": build.recipe.name,
        "signature": build.signature("captions"),
        "backend": sorted(backends)[0] if len(backends) == 1 else sorted(backends),
        "model": sorted(models)[0] if len(models) == 1 else (sorted(models) or None),
        "world_size": ws,
        "done_ranks": sorted(marks),
        "complete": build.is_complete("captions"),
        "target": sum(a.get("target", 0) for a in ordered.values()),
        "kept": sum(a.get("kept", 0) for a in ordered.values()),
        "rejected_total": sum(rejected.values()),
        "rejected": dict(sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))),
        "reasons": {k: REASONS[k] for k in rejected if k in REASONS},
        "short": short,
        "agents": ordered,
        "requests": ({**{k: int(requests[k]) for k in (*REQUEST_KEYS, "attempts")},
                      "retry_reasons": dict(sorted(retry_reasons.items()))}
                     if has_requests else None),
        "usage": dict(usage) if has_requests else None,
        "usage_cached": dict(usage_cached) if has_requests else None,
        "rejected_examples": examples,
        **({"photos": photos, "grounded": dict(sorted(grounded.items()))}
           if photos is not None else {}),
        **({"sessions": merge_sessions(sessions)} if sessions else {}),
    }


def write_report(build: Build) -> dict:
    """Write reports/captions.json and captions.png; returns the report."""
    report = merge_stats(build)
    build.reports_dir.mkdir(parents=True, exist_ok=True)
    write_json(build.reports_dir / "captions.json", report)
    if report["agents"]:
        plot_report(report, build.reports_dir / "captions.png")
    return report


def plot_report(report: dict, path: Path) -> None:
    """A bar per agent: kept and rejected candidates, with the target as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsbuild.core.records import write_figure

    names = list(report["agents"])
    kept = [report["agents"][n]["kept"] for n in names]
    rej = [sum(report["agents"][n]["rejected"].values()) for n in names]
    target = [report["agents"][n]["target"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    y = range(len(names))
    ax.barh(y, kept, color="#4c9a6a", label="kept")
    ax.barh(y, rej, left=kept, color="#d9825b", label="rejected")
    ax.scatter(target, list(y), marker="|", s=200, color="black", label="target", zorder=3)
    ax.set_yticks(list(y), [f"{n} ({report['agents'][n]['level']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("triples")
    ax.set_title(f"captions: {report['kept']} kept, {report['rejected_total']} rejected "
                 f"({report['backend']})", pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    write_figure(path, fig)


def format_summary(report: dict) -> str:
    """The end-of-run summary the CLI prints: kept, rejected by reason, per agent."""
    lines = [f"kept {report['kept']} of {report['target']} target triples "
             f"({report['backend']}), rejected {report['rejected_total']}"]
    if report["rejected"]:
        lines.append("rejected by reason: " + ", ".join(
            f"{k}={v}" for k, v in report["rejected"].items()))
    lines.append(f"{'agent':<20} {'level':<7} {'kept':>6} {'target':>6} {'rejected':>8}")
    for name, a in report["agents"].items():
        lines.append(f"{name:<20} {a['level']:<7} {a['kept']:>6} {a['target']:>6} "
                     f"{sum(a['rejected'].values()):>8}")
    req = report.get("requests")
    if req:
        u = report.get("usage") or {}
        runs = req.get("attempts", 1)
        lines.append(f"requests: {req['sent']} sent, {req['cached']} from cache, "
                     f"{req['retries']} retries, {req['failed']} failed"
                     + (f" over {runs} runs" if runs > len(report["done_ranks"]) else "")
                     + "; tokens: "
                     f"{u.get('prompt_tokens', 0)} prompt + {u.get('completion_tokens', 0)} "
                     "completion")
    if report.get("photos") is not None:
        g = report.get("grounded") or {}
        lines.append(f"from {report['photos']} photos; grounding check on the photo: "
                     f"{g.get('grounded', 0)} passed, "
                     f"{sum(v for k, v in g.items() if k != 'grounded')} rejected")
    ss = report.get("sessions")
    if ss is not None:
        lengths = ", ".join(f"{k} turns: {v}" for k, v in ss["by_length"].items())
        lines.append(f"sessions: {ss['sessions']} with {ss['turns']} turns ({lengths or 'none'}),"
                     f" {ss['branches']} branch points; {sum(ss['rejected'].values())} turns or "
                     f"lines rejected, {ss['cut']} cut under them, {ss['dropped']} sessions "
                     "dropped (short of min_turns)")
    if report["short"]:
        lines.append("short of target (gave up after max rounds): " + ", ".join(
            f"{k} -{v}" for k, v in report["short"].items()))
    return "\n".join(lines)


def summary(build, result) -> list[str]:
    """What ``dsbuild captions`` prints after a rank: the run summary and the report's path."""
    return [*format_summary(result.report).splitlines(),
            f"report: {build.reports_dir / 'captions.json'}"]
