"""Multi-turn edit sessions: the one place that says what a session is and what survives.

A **session** is a tree of edits from one input caption (a chain when no node branches). Its
root is the input caption (or a real photo's caption); every other node is one caption triple
whose ``input`` is its parent's ``output``. Triples of a session carry

- ``session_id``: the session (its recipe, agent, root caption and draw), shared by its nodes;
- ``node_id``: the node, which is the triple's own id;
- ``parent_id``: the parent node's id, None for the root's children (turn 1);
- ``turn``: the node's depth, 1 for an edit of the root.

A generator makes a session **run** per draw of its sweep (one seed, one guidance): every node
of the session in one pass (P2P) or turn after turn (editors), each node's pair taking its
parent's image as input. Pairs of a run share ``session_run`` (:func:`run_id`) and carry the
session fields of their triple; ``images.session_source`` is the run's root image.

What survives is decided here for every reader (filter's report, export, review, the card):
a pair survives when it passes and, in ``prefix`` mode, when its parent's pair in the same run
survives (a failed or rejected turn drops its subtree); in ``whole`` mode a run survives only
when every pair of it passes. Pairs outside sessions survive when they pass.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal

from dsbuild.core.hashing import content_id

SESSION_FIELDS: tuple[str, ...] = ("session_id", "node_id", "parent_id", "turn")
RUN_FIELD = "session_run"
CUT_MODES = ("prefix", "whole")
CutMode = Literal["prefix", "whole"]


def is_session(rec: dict | None) -> bool:
    """Whether a triple, pair or row belongs to a session."""
    return bool(rec and rec.get("session_id"))


def session_id(recipe: str, agent: str, root: str, index: int) -> str:
    """The id of an agent's ``index``-th session from the root caption ``root``."""
    return content_id("session", recipe, agent, root, index)


def node_id(recipe: str, agent: str, inp: str, edit: str, out: str, session: str,
            parent: str | None) -> str:
    """A session node's triple id: the triple's content with its session and parent, so one
    edit in two sessions (or under two parents) is two nodes."""
    return content_id(recipe, agent, inp, edit, out, session, parent or "")


def run_id(session: str, seed: int, guidance: float | None, index: int) -> str:
    """The id of one generated run of a session (one seed and guidance: one image chain)."""
    return content_id("session-run", session, seed, guidance, index)


def plan_run(plan: Any) -> tuple[str, int]:
    """The run a generator's plan of a session node belongs to: (session, draw index). A
    generator plans every node of a session with the same draws (index k: one seed and one
    guidance for the whole run)."""
    return (plan.triple["session_id"], plan.index)


def session_fields(rec: dict) -> dict[str, Any]:
    """The session fields of a triple or pair (empty outside sessions)."""
    if not is_session(rec):
        return {}
    return {k: rec.get(k) for k in SESSION_FIELDS}


def ordered(nodes: Iterable[dict], *, key: str = "node_id") -> list[dict]:
    """Nodes with every parent before its children: by turn, then id (deterministic)."""
    return sorted(nodes, key=lambda n: (int(n.get("turn") or 0), str(n.get(key) or "")))


def children(nodes: Iterable[dict], *, key: str = "node_id") -> dict[str | None, list[dict]]:
    """Parent id (None: the root) -> its child nodes, in :func:`ordered` order."""
    out: dict[str | None, list[dict]] = defaultdict(list)
    for n in ordered(nodes, key=key):
        out[n.get("parent_id")].append(n)
    return dict(out)


def subtree(nodes: Iterable[dict], top: str, *, key: str = "node_id") -> set[str]:
    """The ids of node ``top`` and every node under it."""
    kids = children(nodes, key=key)
    out, todo = set(), [top]
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo += [c[key] for c in kids.get(n, [])]
    return out


def by_run(items: Iterable[dict]) -> dict[str, list[dict]]:
    """Session items (pairs or rows) grouped by ``session_run``; others are left out."""
    out: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        if is_session(it) and it.get(RUN_FIELD):
            out[it[RUN_FIELD]].append(it)
    return dict(out)


def cut(items: Iterable[dict], ok: Callable[[dict], bool], mode: CutMode = "prefix", *,
        key: str = "id") -> set[str]:
    """The ids (``item[key]``) of the items that survive (see the module doc).

    ``items`` are pairs (``key="id"``) or joined rows (``key="pair_id"``); an item's parent in
    its run is the item of the same ``session_run`` whose ``node_id`` is its ``parent_id``.
    A session item whose parent is missing from its run does not survive (its input image is
    not in the data).
    """
    if mode not in CUT_MODES:
        raise ValueError(f"session cut mode {mode!r}: use one of {', '.join(CUT_MODES)}")
    items = list(items)
    out = {it[key] for it in items if not is_session(it) and ok(it)}
    for run in by_run(items).values():
        passed = {it["node_id"]: bool(ok(it)) for it in run}
        if mode == "whole":
            if all(passed.values()):
                out |= {it[key] for it in run}
            continue
        alive: set[str] = set()
        for it in ordered(run):
            parent = it.get("parent_id")
            if passed[it["node_id"]] and (parent is None or parent in alive):
                alive.add(it["node_id"])
                out.add(it[key])
    return out


def run_lengths(items: Iterable[dict]) -> Counter:
    """Runs by their length (deepest turn among the items given): ``{turns: runs}``."""
    out: Counter = Counter()
    for run in by_run(items).values():
        out[max(int(it.get("turn") or 0) for it in run)] += 1
    return out


def tree_counts(triples: Iterable[dict]) -> dict[str, int]:
    """Counts of the sessions among triples: sessions, turns (nodes), branch points (nodes,
    the root included, with more than one child), the deepest turn."""
    by_session: dict[str, list[dict]] = defaultdict(list)
    for t in triples:
        if is_session(t):
            by_session[t["session_id"]].append(t)
    branches = turns = deepest = 0
    for nodes in by_session.values():
        turns += len(nodes)
        deepest = max([deepest, *(int(n.get("turn") or 0) for n in nodes)])
        kids = Counter(n.get("parent_id") for n in nodes)
        branches += sum(1 for c in kids.values() if c > 1)
    return {"sessions": len(by_session), "turns": turns, "branches": branches,
            "max_turn": deepest}


TREE_DIR = "reports/sessions"


def tree_page(session: str) -> str:
    """The build-relative path of a session's design-tree page (``dsbuild tree``); its picture
    is the same path with ``.png``."""
    return f"{TREE_DIR}/{session}.html"


def survival(items: Iterable[dict], ok: Callable[[dict], bool], *, key: str = "id"
             ) -> dict[str, Any]:
    """What a reader's report says of sessions: runs by length as generated (``runs``) and as
    they survive under each cut mode (``prefix``, ``whole``), and per turn the items, those
    that pass (``ok``) and those that survive each mode; ``{}`` without session items. Lengths
    and turns are string keys (JSON)."""
    items = [it for it in items if is_session(it)]
    if not items:
        return {}
    out: dict[str, Any] = {"runs": _keyed(run_lengths(items))}
    per_turn: dict[str, dict[str, int]] = {}
    for it in ordered(items):
        t = per_turn.setdefault(str(int(it.get("turn") or 0)), {"pairs": 0, "passed": 0})
        t["pairs"] += 1
        t["passed"] += bool(ok(it))
    for mode in CUT_MODES:
        alive = cut(items, ok, mode, key=key)
        out[mode] = _keyed(run_lengths(it for it in items if it[key] in alive))
        for it in items:
            t = per_turn[str(int(it.get("turn") or 0))]
            t[mode] = t.get(mode, 0) + (it[key] in alive)
    out["per_turn"] = per_turn
    return out


def _keyed(c: Counter) -> dict[str, int]:
    return {str(k): v for k, v in sorted(c.items())}


def survival_lines(counts: dict[str, int], surv: dict[str, Any], mode: str) -> list[str]:
    """Markdown for a report: what the captions hold (:func:`tree_counts`), then the runs of
    each length generated and surviving (:func:`survival`; ``mode``: the one in force, marked
    with *), then per turn."""
    if not counts.get("sessions") and not surv:
        return []
    lines = [f"Sessions: {counts.get('sessions', 0)} in the captions, {counts.get('turns', 0)} "
             f"turns, {counts.get('branches', 0)} branch points, deepest turn "
             f"{counts.get('max_turn', 0)}.", ""]
    if not surv.get("runs"):
        return lines
    lengths = sorted({int(k) for part in ("runs", *CUT_MODES) for k in surv[part]})
    star = {m: f"{m} *" if m == mode else m for m in CUT_MODES}
    lines += ["Session runs by length (deepest turn kept; * the cut in force, "
              "`export.session_cut`):", "",
              "| runs | " + " | ".join(f"{n} turn{'s' if n != 1 else ''}" for n in lengths)
              + " | total |", "|---" * (len(lengths) + 2) + "|"]
    for part, label in (("runs", "generated"), *((m, f"surviving ({star[m]})")
                                                 for m in CUT_MODES)):
        cells = [surv[part].get(str(n), 0) for n in lengths]
        lines.append(f"| {label} | " + " | ".join(map(str, cells)) + f" | {sum(cells)} |")
    lines += ["", "| turn | pairs | passed | " + " | ".join(f"surviving ({star[m]})"
                                                          for m in CUT_MODES) + " |",
              "|---" * (3 + len(CUT_MODES)) + "|"]
    for turn, t in surv["per_turn"].items():
        lines.append(f"| {turn} | {t['pairs']} | {t['passed']} | "
                     + " | ".join(str(t.get(m, 0)) for m in CUT_MODES) + " |")
    return lines + [""]
