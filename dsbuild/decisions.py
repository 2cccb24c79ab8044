"""Curator decisions (FiftyOne tags, Label Studio annotations) in ``decisions.jsonl``.

A decision: ``pair_id, verdict (accept|reject), reason?, corrected_edit?, reviewer, tool, at``.
Writes merge with what is there and rewrite the file atomically, so pulling twice adds nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from dsbuild.hashing import content_id
from dsbuild.records import read_jsonl, write_jsonl

VERDICTS = ("accept", "reject")


def decision_key(d: dict) -> str:
    """Identity of a decision: the same reviewer's same verdict on a pair counts once."""
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


def add_decisions(build, decisions: Iterable[dict]) -> int:
    """Merge new decisions into decisions.jsonl; returns how many were new."""
    existing = read_decisions(build)
    seen = {decision_key(d) for d in existing}
    added = []
    for d in decisions:
        k = decision_key(d)
        if k in seen:
            continue
        seen.add(k)
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
