"""Curator decisions (FiftyOne tags and operators, Label Studio annotations) in ``decisions.jsonl``.

A decision: ``pair_id, verdict (accept|reject|withdrawn), reason?, corrected_edit?, reviewer,
tool, at``. The file is append-only. A decision fills a *slot*: ``(pair, tool)`` for a tool
that speaks as one (Label Studio's majority; every decision written before slots per reviewer
existed), or ``(pair, tool, reviewer)`` for a decision marked ``per_reviewer`` (FiftyOne), so
several curators of one tool each hold their own verdict. The decision appended last to a
slot is its current one; a pull that finds a verdict gone appends ``withdrawn``. A tool's
verdict on a pair is its slot's decision, or, with several reviewers, their aggregate by the
Label Studio rule (``aggregate``: majority, a tie rejects, agreement between reviewers). The
decision in force for a pair is the latest (by ``at``) of its tools' verdicts. A pull that
repeats a slot's current decision adds nothing, so pulling twice is a no-op.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence

from dsbuild.core.hashing import content_id
from dsbuild.core.records import read_jsonl, write_jsonl

VERDICTS = ("accept", "reject")  # what a curator says
WITHDRAWN = "withdrawn"  # a tool no longer holds a verdict it gave
PER_REVIEWER = "per_reviewer"  # marks a decision whose slot is (pair, tool, reviewer)
DISAGREE = "reviewers_disagree"  # the reason of a tie with no reject reason named

Slot = tuple[str, str, str | None]


def decision_key(d: dict) -> str:
    """What a decision says (not when): pair, tool, reviewer, verdict, reason, fix."""
    return content_id(d.get("pair_id"), d.get("tool"), d.get("reviewer"), d.get("verdict"),
                      d.get("reason"), d.get("corrected_edit"))


def make_decision(pair_id: str, verdict: str, *, tool: str, reviewer: str = "unknown",
                  reason: str | None = None, corrected_edit: str | None = None,
                  at: str | None = None, **extra) -> dict:
    if verdict not in (*VERDICTS, WITHDRAWN):
        raise ValueError(f"verdict must be one of {(*VERDICTS, WITHDRAWN)}, got {verdict!r}")
    d = {"pair_id": pair_id, "verdict": verdict, "reason": reason,
         "corrected_edit": corrected_edit, "reviewer": reviewer, "tool": tool,
         "at": at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    d.update(extra)
    return d


def read_decisions(build) -> list[dict]:
    path = build.decisions_path
    return list(read_jsonl(path)) if path.exists() else []


def _order(d: dict) -> str:
    return str(d.get("at", ""))


def slot(d: dict) -> Slot:
    """Whose verdict ``d`` is: (pair, tool, reviewer) if marked per reviewer, else (pair, tool,
    None), the tool speaking as one."""
    return (d.get("pair_id"), d.get("tool"), d.get("reviewer") if d.get(PER_REVIEWER) else None)


def current_by_slot(decisions: Iterable[dict]) -> dict[Slot, dict]:
    """Each slot's current decision (the one appended last), in the order of the last appends.

    A per-reviewer decision also replaces its tool's single slot when that one was written by
    the same reviewer (a file from before per-reviewer slots): nobody votes twice.
    """
    out: dict[Slot, dict] = {}
    for d in decisions:
        _put(out, d)
    return out


def _put(current: dict[Slot, dict], d: dict) -> None:
    key = slot(d)
    if key[2] is not None:
        legacy = current.get((key[0], key[1], None))
        if legacy is not None and legacy.get("reviewer") == key[2]:
            del current[(key[0], key[1], None)]
    current.pop(key, None)  # re-insert: dict order is then the order of the last appends,
    current[key] = d        # which breaks ties of ``at`` in ``in_force``


def current_by_tool(decisions: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """(pair_id, tool) -> the decision appended last by that tool (any reviewer)."""
    out: dict[tuple[str, str], dict] = {}
    for d in decisions:
        key = (d.get("pair_id"), d.get("tool"))
        out.pop(key, None)
        out[key] = d
    return out


def _reasons(d: dict) -> list[str]:
    """A decision's reject reasons as a list (a tag pull joins several with ", ")."""
    return [r.strip() for r in str(d.get("reason") or "").split(",") if r.strip()]


def pairwise_agreement(verdicts: list[str]) -> float | None:
    """Share of reviewer pairs that gave the same verdict (None with fewer than two)."""
    n = len(verdicts)
    if n < 2:
        return None
    same = sum(c * (c - 1) for c in Counter(verdicts).values())
    return same / (n * (n - 1))


def aggregate(pair_id: str, reviews: list[dict], *, tool: str,
              reason_order: Sequence[str] = (), **extra) -> dict:
    """One decision from several reviewers' answers: the majority verdict (a tie rejects).

    ``reviews``: ``reviewer, verdict, reasons (list), corrected_edit, quality?, at``; a
    reviewer's last answer counts. ``reason`` (rejections only) is the reason named most often
    (ties: ``reason_order``), ``reviewers_disagree`` for a tie without one; the corrected
    instruction given most often (then latest) wins.
    """
    def order(reason: str) -> int:
        return reason_order.index(reason) if reason in reason_order else len(reason_order)

    latest: dict[str, dict] = {}
    for r in sorted(reviews, key=lambda r: (r["at"], r.get("annotation_id") or 0)):
        latest[r["reviewer"]] = r
    reviews = sorted(latest.values(), key=lambda r: r["reviewer"])
    votes = Counter(r["verdict"] for r in reviews)
    tie = votes["accept"] == votes["reject"]
    verdict = "accept" if votes["accept"] > votes["reject"] else "reject"
    reasons = Counter(x for r in reviews if r["verdict"] == "reject" for x in r["reasons"])
    reason = min(reasons, key=lambda x: (-reasons[x], order(x))) \
        if reasons and verdict == "reject" else None
    if tie and reason is None:
        reason = DISAGREE
    fixes = [r for r in reviews if r.get("corrected_edit")]
    fix_count = Counter(r["corrected_edit"] for r in fixes)
    corrected = max(fixes, key=lambda r: (fix_count[r["corrected_edit"]], r["at"]))[
        "corrected_edit"] if fixes else None
    ratings = [r["quality"] for r in reviews if r.get("quality") is not None]
    return make_decision(
        pair_id, verdict, tool=tool, reviewer=",".join(r["reviewer"] for r in reviews),
        reason=reason, corrected_edit=corrected, at=max(r["at"] for r in reviews),
        votes={"accept": votes["accept"], "reject": votes["reject"]},
        annotators=len(reviews), agreement=pairwise_agreement([r["verdict"] for r in reviews]),
        tie=tie, quality=sum(ratings) / len(ratings) if ratings else None,
        reasons=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], order(kv[0])))),
        reviews=[{k: r.get(k) for k in ("reviewer", "verdict", "reasons", "corrected_edit",
                                        "quality", "at")} for r in reviews],
        **extra,
    )


def by_tool(decisions: Iterable[dict], reason_order: Sequence[str] = ()
            ) -> dict[tuple[str, str], dict]:
    """(pair_id, tool) -> that tool's verdict: its one current decision, or the ``aggregate``
    of its reviewers' current decisions (withdrawn ones left out), in order of last appends."""
    slots: dict[tuple[str, str], list[dict]] = {}
    for (pid, tool, _), d in current_by_slot(decisions).items():
        if d.get("verdict") == WITHDRAWN:
            continue
        key = (pid, tool)
        slots[key] = [*slots.pop(key, []), d]  # re-insert: keep the order of the last appends
    out = {}
    for (pid, tool), ds in slots.items():
        if len(ds) == 1:
            out[(pid, tool)] = ds[0]
            continue
        reviews = [{**d, "reasons": _reasons(d)} for d in ds]
        out[(pid, tool)] = aggregate(pid, reviews, tool=tool, reason_order=reason_order)
    return out


def in_force(decisions: Iterable[dict], tool: str | None = None) -> dict[str, dict]:
    """pair_id -> the decision in force: the latest (by ``at``, then file order) of its tools'
    verdicts (``by_tool``), leaving out withdrawn ones (optionally from one tool only)."""
    out: dict[str, dict] = {}
    for (pid, t), d in by_tool(decisions).items():
        if tool and t != tool:
            continue
        prev = out.get(pid)
        if prev is None or _order(d) >= _order(prev):
            out[pid] = d
    return out


def summary(decisions: Iterable[dict]) -> dict:
    """Pairs per tool and verdict in force, and per tool the agreement between reviewers
    (mean pairwise agreement over pairs with two or more reviewers, and how many disagree)."""
    counts: Counter = Counter()
    agree: dict[str, list[float]] = {}
    for (_, tool), d in by_tool(decisions).items():
        counts[f"{tool or '?'}:{d.get('verdict', '?')}"] += 1
        if d.get("agreement") is not None:
            agree.setdefault(tool, []).append(d["agreement"])
    agreement = {t: {"pairs": len(a), "agreement": round(sum(a) / len(a), 4),
                     "disagree": sum(x < 1 for x in a)} for t, a in sorted(agree.items())}
    return {"verdicts": dict(counts), "agreement": agreement}


def add_decisions(build, decisions: Iterable[dict], *,
                  withdraw: tuple[str, Iterable[str]] | None = None,
                  reviewer: str | None = None) -> list[dict]:
    """Append the decisions that change a slot's current one; returns those appended.

    ``withdraw=(tool, present)`` makes the call a snapshot of that tool: a pair in ``present``
    whose current ``tool`` verdict is not among ``decisions`` gets a ``withdrawn`` decision.
    With ``reviewer``, the snapshot is that reviewer's (per-reviewer slots): only their own
    verdicts are withdrawn, and never one given through an operator (``source="operator"``).
    """
    from dsbuild.core import locks

    path = build.decisions_path
    with locks.hold(path.with_name(f".{path.name}.lock"), f"{path}", wait=True):
        return _add_decisions(build, list(decisions), withdraw, reviewer)


def _current_of(current: dict[Slot, dict], d: dict) -> dict | None:
    """The current decision of ``d``'s slot (a per-reviewer one falls back to the tool's
    single slot when that reviewer wrote it)."""
    key = slot(d)
    prev = current.get(key)
    if prev is None and key[2] is not None:
        legacy = current.get((key[0], key[1], None))
        if legacy is not None and legacy.get("reviewer") == key[2]:
            prev = legacy
    return prev


def _add_decisions(build, decisions: list[dict], withdraw: tuple[str, Iterable[str]] | None,
                   reviewer: str | None) -> list[dict]:
    existing = read_decisions(build)
    current = current_by_slot(existing)
    if withdraw is not None:
        tool, present = withdraw
        present = set(present)
        holding = {slot(d) for d in decisions if d.get("tool") == tool}
        for key, d in sorted(current.items(), key=lambda kv: tuple(map(str, kv[0]))):
            pid, t, who = key
            if t != tool or pid not in present or d.get("verdict") == WITHDRAWN:
                continue
            if reviewer is None:
                if who is None and key not in holding:
                    decisions.append(make_decision(pid, WITHDRAWN, tool=tool, reviewer=tool))
            elif d.get("reviewer") == reviewer and d.get("source") != "operator" \
                    and (pid, tool, reviewer) not in holding:
                decisions.append(make_decision(pid, WITHDRAWN, tool=tool, reviewer=reviewer,
                                               **{PER_REVIEWER: True}))
    added = []
    for d in decisions:
        prev = _current_of(current, d)
        if prev is not None and decision_key(prev) == decision_key(d):
            continue
        _put(current, d)
        added.append(d)
    if added:
        write_jsonl(build.decisions_path, existing + added)
    return added


def latest_by_pair(build, tool: str | None = None) -> dict[str, dict]:
    """The decision in force per pair (optionally from one tool); see ``in_force``."""
    return in_force(read_decisions(build), tool)
