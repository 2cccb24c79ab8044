"""Curator decisions (FiftyOne tags, Label Studio annotations) in ``decisions.jsonl``.

A decision: ``pair_id, verdict (accept|reject|withdrawn), reason?, corrected_edit?, reviewer,
tool, at``. The file is append-only. Each pull is a snapshot of what a tool holds now: for each
(pair, tool) the decision appended last is that tool's current one, and a pull that finds a
pair's verdict gone (tags removed, annotations deleted) appends ``withdrawn``. The decision in
force for a pair is the latest (by ``at``) of its tools' current decisions, withdrawn ones left
out. A pull that repeats a tool's current decision adds nothing, so pulling twice is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from dsbuild.hashing import content_id
from dsbuild.records import read_jsonl, write_jsonl

VERDICTS = ("accept", "reject")  # what a curator says
WITHDRAWN = "withdrawn"  # a tool no longer holds a verdict it gave


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


def current_by_tool(decisions: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """(pair_id, tool) -> that tool's current decision: the one appended last."""
    out: dict[tuple[str, str], dict] = {}
    for d in decisions:
        key = (d.get("pair_id"), d.get("tool"))
        out.pop(key, None)  # re-insert: dict order is then the order of the last appends,
        out[key] = d        # which breaks ties of ``at`` in ``in_force``
    return out


def in_force(decisions: Iterable[dict], tool: str | None = None) -> dict[str, dict]:
    """pair_id -> the decision in force: the latest (by ``at``, then file order) of its tools'
    current decisions, leaving out withdrawn ones (optionally from one tool only)."""
    out: dict[str, dict] = {}
    for (pid, t), d in current_by_tool(decisions).items():
        if d.get("verdict") == WITHDRAWN or (tool and t != tool):
            continue
        prev = out.get(pid)
        if prev is None or _order(d) >= _order(prev):
            out[pid] = d
    return out


def add_decisions(build, decisions: Iterable[dict], *,
                  withdraw: tuple[str, Iterable[str]] | None = None) -> list[dict]:
    """Append the decisions that change a tool's current one; returns those appended.

    ``withdraw=(tool, present)`` makes the call a snapshot of that tool: a pair in ``present``
    whose current ``tool`` verdict is not among ``decisions`` gets a ``withdrawn`` decision.
    """
    from dsbuild import locks

    path = build.decisions_path
    with locks.hold(path.with_name(f".{path.name}.lock"), f"{path}", wait=True):
        return _add_decisions(build, list(decisions), withdraw)


def _add_decisions(build, decisions: list[dict],
                   withdraw: tuple[str, Iterable[str]] | None) -> list[dict]:
    existing = read_decisions(build)
    current = current_by_tool(existing)
    if withdraw is not None:
        tool, present = withdraw
        holding = {d.get("pair_id") for d in decisions if d.get("tool") == tool}
        decisions += [make_decision(pid, WITHDRAWN, tool=tool, reviewer=tool)
                      for (pid, t), d in sorted(current.items())
                      if t == tool and pid in set(present) and pid not in holding
                      and d.get("verdict") != WITHDRAWN]
    added = []
    for d in decisions:
        key = (d.get("pair_id"), d.get("tool"))
        prev = current.get(key)
        if prev is not None and decision_key(prev) == decision_key(d):
            continue
        current[key] = d
        added.append(d)
    if added:
        write_jsonl(build.decisions_path, existing + added)
    return added


def latest_by_pair(build, tool: str | None = None) -> dict[str, dict]:
    """The decision in force per pair (optionally from one tool); see ``in_force``."""
    return in_force(read_decisions(build), tool)
