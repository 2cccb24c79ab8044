"""Multi-turn sessions in Label Studio: one task per session run, a verdict per turn.

A session run (:mod:`dsbuild.core.sessions`: one seed's image chain of a session) becomes one
task of a companion project (``<title> · sessions``, ``label_config/session_review.xml``): its
turns in turn order (a tree's nodes with their parent named), each with its input and output
image and instruction, and a verdict, reasons and a corrected instruction per turn. ``pull``
reads each turn's answers back as a decision for that turn's pair, as the per-pair project's
are; what survives a rejected turn is then the export's ``sessions.cut``.

Which turns a task shows: the run's pairs that can still be exported before review, i.e. that
survive ``sessions.cut`` (``export.session_cut``) with the filter's keep as the test (every
pair of the run with ``--policy all``). A run enters when any of its pairs is selected (under
the review queue, ``review.queue=export``: when any of its turns is still headed for the
export).
"""

from __future__ import annotations

from collections import defaultdict

from dsbuild.core import join
from dsbuild.core import sessions as S
from dsbuild.core.hashing import content_id

SESSION_MODES = ("session", "pair", "both")  # review.session_tasks
CONTROLS = ("verdict", "reason", "corrected_edit")  # per turn: <control>_<index>
CONFIG_MARK = 'name="verdict_{{idx}}"'  # how a project is known to use session_review.xml
# the joined row's fields a turn carries, images aside
TURN_FIELDS = ("pair_id", "triple_id", "node_id", "parent_id", "turn", "operation",
               "original_prompt", "edit_prompt", "edited_prompt", "clip_sim_dir",
               "clip_sim_image", "verify", "verify_reason", "judge_score", "review_priority")


def cut_mode(build) -> str:
    """The export's session cut (prefix | whole), prefix where the setting is absent."""
    return getattr(build.config.export, "session_cut", "prefix")


def session_runs(build, selected: list[dict], *, policy: str = "kept") -> dict[str, list[dict]]:
    """Session run -> the joined rows its task shows, in turn order (parents first), for the
    runs with a pair among ``selected``."""
    wanted = {r["session_run"] for r in selected if S.is_session(r) and r.get("session_run")}
    if not wanted:
        return {}
    rows, _ = join.rows(build, policy="all")
    runs = {run: items for run, items in S.by_run(rows).items() if run in wanted}
    ok = (lambda r: True) if policy == "all" else (lambda r: bool(r.get("filter_keep")))
    out = {}
    for run, items in sorted(runs.items()):
        alive = S.cut(items, ok, cut_mode(build), key="pair_id")
        shown = [r for r in S.ordered(items) if r["pair_id"] in alive]
        if shown:
            out[run] = shown
    return out


def _heading(row: dict, rows: dict[str, dict], number: dict[str, int]) -> str:
    turn = row.get("turn")
    parent = rows.get(row.get("parent_id"))
    if parent is None:
        return f"Turn {turn} (#{number[row['node_id']]}): an edit of the source image"
    return (f"Turn {turn} (#{number[row['node_id']]}): an edit of #{number[parent['node_id']]}"
            f" (\u201c{parent.get('edit_prompt')}\u201d)")


def session_task_data(run: str, rows: list[dict], urls: dict[str, dict[str, str]]) -> dict:
    """The task payload of one session run: the session, and ``turns`` (one item per turn, in
    the order of ``rows``, each naming its parent turn)."""
    by_node = {r["node_id"]: r for r in rows}
    number = {r["node_id"]: i + 1 for i, r in enumerate(rows)}
    first = rows[0]
    turns = []
    for i, r in enumerate(rows):
        item = {k: r.get(k) for k in TURN_FIELDS}
        item.update(index=i, heading=_heading(r, by_node, number),
                    input_image=urls[r["pair_id"]]["input"],
                    edited_image=urls[r["pair_id"]]["output"])
        turns.append(item)
    deepest = max(int(r.get("turn") or 0) for r in rows)
    branches = sum(1 for kids in S.children(rows).values() if len(kids) > 1)
    summary = (f"{first.get('agent')} · {first.get('level')} · {len(rows)} turns, deepest "
               f"turn {deepest}" + (f", {branches} branch points" if branches else "")
               + f" · source: \u201c{first.get('original_prompt')}\u201d")
    return {"session_run": run, "session_id": first.get("session_id"),
            "agent": first.get("agent"), "level": first.get("level"),
            "seed": first.get("seed"), "generator": first.get("generator"),
            "original_prompt": first.get("original_prompt"),
            "source_image": urls[first["pair_id"]]["input"], "summary": summary,
            "pair_ids": [r["pair_id"] for r in rows], "turns": turns,
            "content": task_content(rows)}


def task_content(rows: list[dict]) -> str:
    """What a session task shows, as an id: its turns' pairs and generated instructions, in
    order (a re-push rewrites a task whose content changed while nobody has answered it; a
    reviewer's corrected instruction changes nothing here)."""
    return content_id("session-task", [
        (r["pair_id"], r.get("parent_id"), r.get("original_edit") or r.get("edit_prompt"))
        for r in rows])


def turn_results(ann: dict) -> dict[int, dict]:
    """A session annotation split per turn: turn index -> the annotation with only that turn's
    results, under the per-pair control names (verdict, reason, corrected_edit)."""
    items: dict[int, list[dict]] = defaultdict(list)
    for item in ann.get("result") or []:
        base, _, index = str(item.get("from_name") or "").rpartition("_")
        if base in CONTROLS and index.isdigit():
            items[int(index)].append({**item, "from_name": base})
    return {i: {**ann, "result": found} for i, found in sorted(items.items())}
