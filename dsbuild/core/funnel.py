"""The survival funnel: where a build's data dies, per stage and per agent / operation.

Steps, each a subset of the one before (edit pairs only; augment's no-change samples are not
counted)::

    requested     triples the captions stage was asked for (its markers' targets)
    triples       valid triples written
    generated     pairs generated
    kept          pairs the filter kept
    verified      kept pairs that passed verify's own checks (the judge's aside)
    judged        ... that the judge passed too (a missing judge score passes, counted aside)
    accepted      ... that a curator accepted (reviewed: how many had a verdict at all)
    headed        pairs that would be exported now (dsbuild.core.survival.headed)
    exported      edit rows of the last export written (BUILD/export)

A step that did not run is None (verify not complete, the judge off, no decisions yet, no
export) and the shares skip it. ``next`` is the command to run next. Computed from the records
on every call (``dsbuild status``, the dataset card); it reads no stage package.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

STEPS = ("requested", "triples", "generated", "kept", "verified", "judged", "accepted",
         "headed", "exported")
LABELS = {"requested": "requested", "triples": "valid triples", "generated": "pairs generated",
          "kept": "kept by filter", "verified": "passed verify", "judged": "passed the judge",
          "accepted": "accepted in review", "headed": "headed for export",
          "exported": "exported"}
BY = ("agent", "operation")


def _judge_only(row: dict) -> bool:
    """verify rejected the row only because of the judge (its own checks passed)."""
    return row.get("verify") == "reject" and str(row.get("verify_reason") or "").startswith(
        "judge_")


def _requested(build) -> tuple[int | None, dict[str, int]]:
    total, per_agent = 0, Counter()
    marks = build.markers("captions")
    if not marks:
        return None, {}
    for m in marks.values():
        st = m.get("stats") or {}
        total += int(st.get("target") or 0)
        for name, a in (st.get("agents") or {}).items():
            per_agent[name] += int(a.get("target") or 0)
    return total, dict(per_agent)


def _exported(build) -> dict | None:
    from dsbuild.core.exports import export_info

    info = export_info(Path(build.output_dir("export")))
    if not info:
        return None
    by = info.get("by") or {}
    total = sum(int(c.get("rows", 0)) - int(c.get("no_change", 0))
                for c in (info.get("counts") or {}).values())
    return {"total": total, "by": by, "at": info.get("exported_at"),
            "stale": info.get("signature") != build.signature("export")}


def rows_exported(rows) -> dict:
    """The ``exported`` step of export rows about to be written (the dataset card's funnel)."""
    from collections import Counter as C

    edits = [r for r in rows if not r.get("no_change")]
    return {"total": len(edits), "at": None,
            "by": {k: dict(C(str(r.get(k)) for r in edits)) for k in BY}}


def funnel(build, exported: dict | None = None) -> dict:
    """The funnel of ``build``: ``steps`` (name, label, count, share of the previous step that
    ran), ``by`` agent and operation (the same counts per key), ``aside`` (judge scores
    missing, pairs reviewed) and ``next`` (the command to run next). ``exported``: the
    :func:`rows_exported` of an export being written (default: the last one written)."""
    from dsbuild.core import join

    requested, req_agent = _requested(build)
    complete = {s: build.is_complete(s) for s in ("captions", "generate", "filter", "verify")}
    triples = list(build.records("captions", require=False)) if build.markers("captions") \
        else []
    rows: list[dict] = []
    if build.markers("generate"):
        rows, _ = join.rows(build, policy="all", scores=complete["filter"])
    verify_ran = complete["verify"]
    judge_ran = verify_ran and any(r.get("judge_pass") is not None or r.get("judge_missing")
                                   for r in rows)
    decided = any(r.get("review") for r in rows)
    exported = exported if exported is not None else _exported(build)

    def step_of(r: dict) -> str:
        """The last step a generated pair reached."""
        if not r.get("filter_keep"):
            return "generated"
        if verify_ran and r.get("verify") != "pass" and not _judge_only(r):
            return "kept"
        if judge_ran and r.get("verify") != "pass":
            return "verified"
        if decided and r.get("review") != "accept":
            return "judged"
        return "accepted"

    ran = {"requested": requested is not None, "triples": bool(build.markers("captions")),
           "generated": bool(build.markers("generate")), "kept": complete["filter"],
           "verified": verify_ran, "judged": judge_ran, "accepted": decided,
           "headed": complete["filter"], "exported": exported is not None}
    order = ("generated", "kept", "verified", "judged", "accepted")

    def counts(sel_rows: list[dict], sel_triples: list[dict], req: int | None,
               exp: int | None) -> dict[str, int | None]:
        reached = Counter(step_of(r) for r in sel_rows)
        out: dict[str, int | None] = {"requested": req, "triples": len(sel_triples)}
        for i, s in enumerate(order):
            out[s] = sum(reached[t] for t in order[i:])
        out["headed"] = sum(bool(r.get("headed")) for r in sel_rows)
        out["exported"] = exp
        return {s: (out[s] if ran[s] else None) for s in STEPS}

    edit_rows = [r for r in rows if not r.get("no_change")]
    total = counts(edit_rows, triples, requested, exported["total"] if exported else None)
    by: dict[str, dict[str, dict]] = {}
    for key in BY:
        groups: dict[str, list[dict]] = defaultdict(list)
        tgroups: dict[str, list[dict]] = defaultdict(list)
        for r in edit_rows:
            groups[str(r.get(key))].append(r)
        for t in triples:
            tgroups[str(t.get(key))].append(t)
        exp_by = (exported or {}).get("by", {}).get(key, {})
        by[key] = {k: counts(groups.get(k, []), tgroups.get(k, []),
                             req_agent.get(k) if key == "agent" and requested is not None
                             else None,
                             exp_by.get(k, 0) if exported else None)
                   for k in sorted(set(groups) | set(tgroups))}
    return {"steps": _steps(total), "counts": total, "by": by,
            "aside": {"judge_missing": sum(bool(r.get("judge_missing")) for r in edit_rows),
                      "reviewed": sum(bool(r.get("review")) for r in edit_rows),
                      "exported_at": (exported or {}).get("at"),
                      "export_stale": bool((exported or {}).get("stale"))},
            "next": next_command(build, complete, decided, exported)}


def _steps(counts: dict[str, int | None]) -> list[dict]:
    """Each step's count and share of the last step before it that ran; pairs generated are
    pairs, not triples: their ``per_triple`` instead of a share."""
    out, prev = [], None
    for s in STEPS:
        n = counts[s]
        share = None if n is None or not prev else round(n / prev, 4)
        entry = {"step": s, "label": LABELS[s], "count": n, "share": share}
        if s == "generated":
            entry["share"], entry["per_triple"] = None, share
        out.append(entry)
        if n is not None:
            prev = n
    return out


def next_command(build, complete: dict[str, bool], decided: bool, exported: dict | None
                 ) -> str:
    """What to run next: the pipeline while a stage is unfinished, then review, export, push."""
    from dsbuild.core import stages

    b = str(build.root)
    unfinished = [st.name for st in stages.all_stages() if st.name != "export"
                  and build.is_active(st.name) and not build.is_complete(st.name)]
    if not all(complete.values()) or unfinished:
        return f"dsbuild run {b}"
    if not decided:
        return f"dsbuild inspect {b}  (FiftyOne; or: dsbuild review push {b})"
    if exported is None or exported.get("stale"):  # none yet, or settings/decisions changed
        return f"dsbuild export {b}"
    return f"dsbuild push {b} <user>/<dataset>"


def plot(f: dict, path: Path) -> Path:
    """A funnel picture: one bar per step that ran (count and share), and beside it each
    agent's share of its generated pairs that reach the last step."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from dsbuild.core.records import write_bytes

    steps = [s for s in f["steps"] if s["count"] is not None]
    agents = f["by"]["agent"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * max(len(steps), 4) + 1.5),
                             gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    labels = [s["label"] for s in steps][::-1]
    values = [s["count"] for s in steps][::-1]
    ax.barh(labels, values, color="#4c72b0")
    top = max(values or [1])
    for i, s in enumerate(steps[::-1]):
        share = f"  ({s['share']:.0%})" if s["share"] is not None else ""
        if s.get("per_triple") is not None:
            share = f"  ({s['per_triple']:.1f} per triple)"
        ax.text(s["count"] + top * 0.01, i, f"{s['count']}{share}", va="center", fontsize=9)
    ax.set_xlim(0, top * 1.25 or 1)
    ax.set_title("survival funnel")
    ax2 = axes[1]  # per agent: the share of its generated pairs still alive at the end
    last = steps[-1]["step"] if steps else "generated"
    share = {a: (c.get(last) or 0) / c["generated"] for a, c in agents.items()
             if c.get("generated")}
    names = sorted(share, key=lambda a: share[a])
    ax2.barh(names, [share[a] for a in names], color="#dd8452")
    ax2.set_xlim(0, 1)
    ax2.tick_params(axis="y", labelsize=7)
    ax2.set_title(f"per agent: {LABELS[last]} / pairs generated", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path


def table(f: dict) -> list[str]:
    """The funnel as aligned text lines (``dsbuild status``)."""
    out = []
    for s in f["steps"]:
        n = "not run" if s["count"] is None else str(s["count"])
        share = f"{s['share']:.0%}" if s["share"] is not None else ""
        if s.get("per_triple") is not None:
            share = f"{s['per_triple']:.1f}/triple"
        out.append(f"{s['label']:<20} {n:>8} {share:>6}")
    return out
