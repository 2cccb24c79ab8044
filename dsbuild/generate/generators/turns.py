"""Multi-turn sessions (:mod:`dsbuild.core.sessions`) for the generators that edit an image
(editor, api, inpaint): a run's turns are sequential edits, turn 1 of the root image (the
root caption's source image, or the photo), each later node of its parent node's output.

Every node of a session draws the same seeds and knobs (:func:`draw_key`), so a run (one draw
index k: ``sessions.plan_run``) has one seed and one setting of the knobs for all its turns.
A node's output is put on the PNG's 1/255 grid before its children edit it, so a child's
input image is its parent's output PNG, pixel-equal.

Resume: the stage hands a session run whole when any of its pairs is missing, and the turns a
killed run wrote must equal the ones made again. So a session's runs are cut into fixed
**blocks** (by draw index, sized by the batch and the session's widest turn, never by which
runs are still to make): a block's roots are made in one call and each of its turns edited in
the same batches whichever of its runs are asked for. A generator re-plans the block's other
runs to fill it (:func:`blocks`) and yields only the pairs asked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from dsbuild.core import sessions
from dsbuild.core.generators import Plan
from dsbuild.core.hashing import content_id


def is_session_plan(plan: Plan) -> bool:
    return sessions.is_session(plan.triple)


def split(plans: list[Plan]) -> tuple[list[Plan], list[Plan]]:
    """(single-edit plans, session plans)."""
    single = [p for p in plans if not is_session_plan(p)]
    return single, [p for p in plans if is_session_plan(p)]


def draw_key(triple: dict) -> dict:
    """What a sweep draws a triple's seeds and knobs from: the triple itself (its id and input
    caption), or for a session node its session, so every node of the session draws the
    same seed and knobs at the same index."""
    if not sessions.is_session(triple):
        return triple
    sid = triple["session_id"]
    return {"id": sid, "input": sid}


def session_group(triple: dict, seed: int) -> tuple:
    """A session plan's group: its session and seed (the root image is the run's)."""
    return ("session", triple["session_id"], seed)


def on_grid(image) -> np.ndarray:
    """A float image in [0, 1] on the PNG's 1/255 grid (what its PNG holds)."""
    return np.round(np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255) / 255


@dataclass
class Run:
    """One run of a session: its nodes' plans, parents first, and which are asked for."""

    session: str
    index: int
    plans: list[Plan]
    asked: set[str]  # ids of the plans to yield
    orphans: int = 0  # nodes left out: their parent has no plan in this run
    id: str = field(init=False)

    def __post_init__(self) -> None:
        first = self.plans[0]
        self.id = sessions.run_id(self.session, first.seed, first.params.get("guidance"),
                                  self.index)

    @property
    def seed(self) -> int:
        return self.plans[0].seed

    @property
    def root(self) -> tuple:
        """The root image's source group (generators/source.py): the root caption (turn 1's
        input) and the seed, with the photo id where the session edits a photo."""
        t = next(p.triple for p in self.plans if p.triple.get("parent_id") is None)
        pid = t.get("photo_id")
        return (t["input"], self.seed, pid) if pid else (t["input"], self.seed)

    def record(self, plan: Plan, extra: dict | None = None) -> dict:
        """The pair-record fields of a node: its session fields and the run."""
        return {**(extra or {}), **sessions.session_fields(plan.triple),
                sessions.RUN_FIELD: self.id}

    def node_source_id(self, plan: Plan, root_id: str) -> str:
        """The id of the image a node edits: the root's, or its parent's output."""
        parent = plan.triple.get("parent_id")
        return root_id if parent is None else content_id("session-node", self.id, parent)


def _run(session: str, index: int, plans: list[Plan], asked: set[str]) -> Run | None:
    plans = sorted(plans, key=lambda p: (int(p.triple.get("turn") or 0), p.triple["id"]))
    kept: list[Plan] = []
    have: set[str] = set()
    for p in plans:
        if p.triple.get("parent_id") is None or p.triple["parent_id"] in have:
            kept.append(p)
            have.add(p.triple["id"])
    if not kept:
        return None
    return Run(session, index, kept, asked, orphans=len(plans) - len(kept))


def blocks(plans: list[Plan], replan: Callable[[dict], list[Plan]],
           rows: int) -> Iterator[list[Run]]:
    """The session plans' runs in fixed blocks, session after session: a block holds the runs
    of draw indexes ``[b * per, (b + 1) * per)`` with ``per = rows // widest turn`` (at least
    1), every run of it (re-planned with ``replan`` where not asked for), so a block's batches
    do not depend on which of its runs are asked for."""
    by_session: dict[str, list[Plan]] = {}
    for p in plans:
        by_session.setdefault(p.triple["session_id"], []).append(p)
    for sid in sorted(by_session):
        asked = by_session[sid]
        nodes = {p.triple["id"]: p.triple for p in asked}
        widest = max(Counter(int(t.get("turn") or 0) for t in nodes.values()).values())
        per = max(1, rows // widest)
        mine = {(p.triple["id"], p.index): p for p in asked}
        wanted = sorted({p.index // per for p in asked})
        every = [p for t in sessions.ordered(nodes.values()) for p in replan(t)]
        for b in wanted:
            runs: dict[int, list[Plan]] = {}
            for p in every:
                if p.index // per == b:
                    runs.setdefault(p.index, []).append(mine.get((p.triple["id"], p.index), p))
            ids = {p.id for p in asked if p.index // per == b}
            block = [_run(sid, k, runs[k], ids) for k in sorted(runs)]
            yield [r for r in block if r is not None]


def by_turn(block: list[Run], only_asked: bool = False) -> Iterator[list[tuple[Run, Plan]]]:
    """A block's nodes turn by turn (every run's turn 1, then every run's turn 2, ...), in
    run order; ``only_asked``: the runs holding a plan asked for."""
    runs = [r for r in block if not only_asked or r.asked & {p.id for p in r.plans}]
    deepest = max((int(p.triple.get("turn") or 0) for r in runs for p in r.plans), default=0)
    for turn in range(1, deepest + 1):
        step = [(r, p) for r in runs for p in r.plans if int(p.triple.get("turn") or 0) == turn]
        if step:
            yield step


def roots(block: list[Run], make: Callable[[list[tuple]], list[np.ndarray]],
          batch: int) -> dict[tuple, np.ndarray]:
    """The root images of a block's runs by source group (float64 on the 1/255 grid, as
    every node's output), made ``batch`` at a time in the block's order (the same calls
    whichever runs are asked for)."""
    keys = list(dict.fromkeys(r.root for r in block))
    out: dict[tuple, np.ndarray] = {}
    for i in range(0, len(keys), max(1, batch)):
        part = keys[i:i + max(1, batch)]
        out.update(zip(part, map(on_grid, make(part)), strict=True))
    return out


def stats(runs: int, orphans: int, **more: int) -> dict:
    """Session counters for the stage's marker (empty where no session was made, so a build
    without sessions reports as before)."""
    if not runs:
        return {}
    return {"session_runs": runs, **({"session_orphans": orphans} if orphans else {}), **more}
