"""Curator decisions (FiftyOne tags, Label Studio annotations) in ``decisions.jsonl``.

A decision: ``pair_id, verdict (accept|reject), reason?, corrected_edit?, reviewer, tool, at``.
Writes merge with what is there (a decision that repeats the latest one of its pair, tool and
reviewer is dropped) and rewrite the file atomically, so pulling twice adds nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from dsbuild.hashing import content_id
from dsbuild.records import read_jsonl, write_jsonl

VERDICTS = ("accept", "reject")


def decision_key(d: dict) -> str:
    """What a decision says (not when): pair, tool, reviewer, verdict, reason, fix."""
    return content_id(d.get("pair_id"), d.get("tool"), d.get("reviewer"), d.get("verdict"),
                      d.get("reason"), d.get("corrected_edit"))


def make_decision(pair_id: str, verdict: str, *, tool: str, reviewer: str = "unknown",
                  reason: str | None = None, corrected_edit: str | None = None,
                  at: str | None = None, **extra) -> dict:
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
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


def add_decisions(build, decisions: Iterable[dict]) -> int:
    """Merge new decisions into decisions.jsonl; returns how many were new.

    A decision is new unless it repeats the latest one of the same pair, tool and reviewer (or,
    being older than that one, is already there with the same ``at``), so pulling twice adds
    nothing, while a changed mind that comes back (accept, reject, accept) is recorded each time
    and stays the one in force.
    """
    existing = read_decisions(build)
    seen = {(decision_key(d), _order(d)) for d in existing}
    last: dict[tuple, dict] = {}
    for d in existing:  # file order breaks ties of ``at``, as in latest_by_pair
        g = (d.get("pair_id"), d.get("tool"), d.get("reviewer"))
        if g not in last or _order(d) >= _order(last[g]):
            last[g] = d
    added = []
    for d in decisions:
        g = (d.get("pair_id"), d.get("tool"), d.get("reviewer"))
        prev = last.get(g)
        k = decision_key(d)
        newest = prev is None or _order(d) >= _order(prev)
        if (prev is not None and decision_key(prev) == k) or \
                (not newest and (k, _order(d)) in seen):
            continue
        seen.add((k, _order(d)))
        if newest:
            last[g] = d
        added.append(d)
    if added:
        write_jsonl(build.decisions_path, existing + added)
    return len(added)


def latest_by_pair(build, tool: str | None = None) -> dict[str, dict]:
    """The most recent decision per pair (optionally from one tool)."""
    out: dict[str, dict] = {}
    for d in read_decisions(build):
        if tool and d.get("tool") != tool:
            continue
        prev = out.get(d["pair_id"])
        if prev is None or str(d.get("at", "")) >= str(prev.get("at", "")):
            out[d["pair_id"]] = d
    return out
