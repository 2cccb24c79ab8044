"""``dsbuild eval --turns``: MagicBrush's multi-turn protocol on the rows of sessions.

Per session run (``session_run``; ``session_id`` where data has no run column), turn 1 edits the
run's source image (the turn-1 row's ``input_image``) and every later turn edits the model's
**own** output of its parent turn, never the ground-truth input. Each turn's output is scored
against that turn's ground truth (``edited_image``) with the metrics the single-turn table
uses against the truth (CLIP-I, DINO, L1: MagicBrush's definitions, :mod:`dsbuild.core.metrics`),
per turn and at the final turn of each chain (every leaf of a run's tree).

Turn 1's own input is the row's input, so its edit is the single-turn edit at the main image
guidance: it is read from that folder, not made twice. Later turns are written under the same
folder's ``turns/`` (one PNG per row, the row's seed), so a re-run resumes; a turn whose parent
was edited again in this run is edited again too, so no turn is kept on a stale input. Which
rows a run can follow is :func:`dsbuild.core.sessions.cut`'s prefix rule: a turn whose parent
row is not in the data (``--rows`` cut it off) is skipped and counted, with its subtree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from dsbuild.core import sessions
from dsbuild.core.errors import DsbuildError
from dsbuild.train.data import SESSION_COLUMNS

TURNS_DIR = "turns"
PROTOCOL = ("MagicBrush multi-turn: turn 1 edits the session's source image, each later turn "
            "the model's own output of its parent turn; scored against each turn's ground truth")


@dataclass
class TurnPlan:
    """The session rows a model follows turn by turn."""

    by_turn: dict[int, list] = field(default_factory=dict)  # turn -> its rows (EditRow)
    parent: dict[int, int] = field(default_factory=dict)  # row index -> its parent's row index
    leaves: list[int] = field(default_factory=list)  # row indices of the chains' final turns
    runs: int = 0
    skipped: int = 0  # session rows whose parent turn is not in the data

    @property
    def rows(self) -> list:
        return [r for t in sorted(self.by_turn) for r in self.by_turn[t]]


def plan_turns(rows, columns, where: str) -> TurnPlan:
    """Which rows of ``rows`` follow which (see the module doc); refused, with what to do,
    when the data has no session rows."""
    missing = [c for c in ("session_id", "turn", "node_id", "parent_id") if c not in columns]
    fix = ("; --turns needs an export of a build with sessions (captions.sessions.share > 0) "
           "or drop --turns")
    if missing:
        raise DsbuildError(f"--turns: {where} has no session columns (missing: "
                           f"{', '.join(missing)}; needs {', '.join(SESSION_COLUMNS)}){fix}")
    items, index = [], {}
    for r in rows:
        if not r.session_id:
            continue
        if r.node_id is None or r.turn is None:
            raise DsbuildError(f"--turns: {where} row {r.index}: session {r.session_id} row "
                               "without node_id or turn; re-export the build")
        item = {"index": r.index, "session_id": r.session_id, "node_id": r.node_id,
                "parent_id": r.parent_id, "turn": r.turn,
                sessions.RUN_FIELD: r.session_run or r.session_id}
        key = (item[sessions.RUN_FIELD], r.node_id)
        if key in index:
            raise DsbuildError(f"--turns: {where} rows {index[key]} and {r.index} are the same "
                               f"node {r.node_id} of one session run; drop the duplicate")
        index[key] = r.index
        items.append(item)
    if not items:
        raise DsbuildError(f"--turns: {where} has no session rows (its session_id column is "
                           f"empty: single edits only){fix}")
    alive = sessions.cut(items, lambda _: True, "prefix", key="index")
    plan = TurnPlan(skipped=len(items) - len(alive))
    by_index = {r.index: r for r in rows}
    has_child: set[int] = set()
    by_turn: dict[int, list] = defaultdict(list)
    runs = set()
    for it in sessions.ordered(i for i in items if i["index"] in alive):
        run = it[sessions.RUN_FIELD]
        runs.add(run)
        by_turn[int(it["turn"])].append(by_index[it["index"]])
        if it["parent_id"] is not None:
            parent = index[(run, it["parent_id"])]
            plan.parent[it["index"]] = parent
            has_child.add(parent)
    plan.by_turn = dict(by_turn)
    plan.leaves = [r.index for r in plan.rows if r.index not in has_child]
    plan.runs = len(runs)
    return plan


def own_paths(plan: TurnPlan, single: Path) -> dict[int, Path]:
    """Row index -> the model's own edit of that turn: turn-1 rows' are the single-turn edits
    in ``single`` (their input is the source image), later turns' are under ``single/turns``."""
    return {r.index: (single if r.index not in plan.parent else single / TURNS_DIR)
            / f"{r.index:05d}.png" for r in plan.rows}


def follow(editor, plan: TurnPlan, single: Path, s, ig: float, remade: set[int],
           desc: str, make_edits) -> None:
    """Edit the later turns not yet made, turn after turn, each on the model's own output of
    its parent turn. ``editor()`` gives the pipeline (loaded on first need); ``remade``: rows
    edited again in this run (their children are edited again too); ``make_edits``: eval's
    edit function (:func:`dsbuild.evaluate.run.make_edits`)."""
    own = own_paths(plan, single)
    remade = set(remade)
    for t in sorted(plan.by_turn):
        later = [r for r in plan.by_turn[t] if r.index in plan.parent]
        todo = [r for r in later
                if not own[r.index].exists() or plan.parent[r.index] in remade]
        if not todo:
            continue
        for r in todo:
            own[r.index].unlink(missing_ok=True)
        fed = [replace(r, input_image=_open_path(own[plan.parent[r.index]])) for r in todo]
        remade |= set(make_edits(editor(), fed, single / TURNS_DIR, s, ig,
                                 f"{desc} turn {t}"))


def turn_scores(plan: TurnPlan, own: dict[int, Path], truths: dict[int, Path],
                emb: dict, against_truth) -> dict:
    """Mean CLIP-I, DINO and L1 against each turn's truth: ``per_turn`` ({turn: means}) and
    ``final`` (the chains' last turns), each with its row count; ``against_truth``: the
    single-turn table's scorer (:func:`dsbuild.evaluate.run.against_truth`)."""
    from dsbuild.core import metrics

    def means(indices: list[int]) -> dict:
        vals = against_truth([own[i] for i in indices], [truths[i] for i in indices], emb)
        return {**metrics.mean_metrics(vals), "rows": len(indices)}

    return {"per_turn": {str(t): means([r.index for r in rows])
                         for t, rows in sorted(plan.by_turn.items())},
            "final": means(plan.leaves)}


def turns_summary(plan: TurnPlan, ig: float) -> dict:
    """What the result JSON says of the rows followed."""
    return {"protocol": PROTOCOL, "image_guidance": ig, "runs": plan.runs,
            "rows": {str(t): len(rows) for t, rows in sorted(plan.by_turn.items())},
            "final_rows": len(plan.leaves), "skipped": plan.skipped}


def chain_grid(plan: TurnPlan, own: dict[int, Path], truths: dict[int, Path],
               inputs: dict[int, Path], title: str, limit: int = 6):
    """The first chains (leaf by leaf): source, then each turn's own edit beside its truth."""
    from dsbuild.core.grid import image_grid

    by_index = {r.index: r for r in plan.rows}
    lines, deepest = [], 1
    for leaf in plan.leaves[:limit]:
        chain = [leaf]
        while chain[-1] in plan.parent:
            chain.append(plan.parent[chain[-1]])
        chain.reverse()
        deepest = max(deepest, len(chain))
        cells = [_open_path(inputs[chain[0]])]
        for i in chain:
            cells += [_open_path(own[i]), _open_path(truths[i])]
        label = "; ".join(f"{t}: {by_index[i].edit_prompt}" for t, i in enumerate(chain, 1))
        lines.append((label, cells))
    headers = ["source", *(h for t in range(1, deepest + 1)
                           for h in (f"turn {t} (own)", f"turn {t} truth"))]
    return image_grid(lines, title=title, headers=headers)


def _open_path(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
