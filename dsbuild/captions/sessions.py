"""Sessions in the captions stage: compose them (template backend), check the session lines
of either backend turn by turn, and count them (docs/sessions.md "Captions").

A session candidate is one JSON object, ``{"input": root caption, "turns": [{"edit", "output",
"parent", "operation"?}, ...]}``, where a turn's ``parent`` is the index of the earlier turn
whose output it edits (null: the root caption). What a session is, and its ids, is
:mod:`dsbuild.core.sessions`. Every turn is checked by the stage's Validator against the caption
it applies to (its parent's output); a turn that fails is counted with its reason and cuts its
subtree; a session whose kept turns do not reach ``min_turns`` is dropped (counted).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from dsbuild.captions.grounding import CaptionEditor
from dsbuild.captions.prompt import NOT_JSON
from dsbuild.captions.settings import SessionSettings
from dsbuild.captions.template import TemplateComposer
from dsbuild.captions.validate import FIELDS, Validator, clean_text
from dsbuild.core import sessions as S
from dsbuild.core.config import Agent
from dsbuild.core.hashing import content_id


def session_target(target: int, settings: SessionSettings) -> int:
    """Session turns (nodes) an agent with ``target`` triples writes: ``share`` of it, at
    least one session of ``min_turns`` where the share is above 0, never above ``target``."""
    if settings.share <= 0 or target <= 0:
        return 0
    return min(target, max(settings.min_turns, round(settings.share * target)))


def expected_nodes(settings: SessionSettings) -> float:
    """About how many turns a session has (sizes the openai rounds)."""
    chain = (settings.min_turns + settings.turns) / 2
    extra = settings.branch_share * (settings.branches - 1) * chain / 2
    return max(1.0, chain + extra)


# ------------------------------------------------------------------------------ template


class SessionComposer:
    """Endless stream of session candidates for one agent (checked by the caller).

    The root and turn 1 are a TemplateComposer candidate of the agent's session stream (its own
    seeded RNG, apart from the single edits'); each later turn edits the turn before's output
    (:class:`CaptionEditor` on a synthetic caption). A chain runs ``min_turns..turns`` deep;
    ``branch_share`` of the sessions are trees: one node (the root or a chain node above the
    deepest turn) gets 2..``branches`` edits, each continued as a chain. Seeded by
    (``captions.seed``, agent): deterministic and independent of the ranks.

    With ``photo`` (a photo's id and caption) every session's root is the photo's caption and
    its turn-1 edits are the photo path's (an add appends a thing the caption does not name);
    seeded by (``captions.seed``, agent, photo).
    """

    TRIES = 20  # draws for one turn's edit before its path ends there

    def __init__(self, agent: Agent, seed: int, settings: SessionSettings,
                 photo: tuple[str, str] | None = None):
        self.agent, self.settings = agent, settings
        self.ops = list(agent.operations)
        if photo is None:
            self.rng = random.Random(content_id("template-session", seed, agent.name))
            self.roots = TemplateComposer(agent, seed, stream="session").candidates()
            self.root = None
        else:
            self.rng = random.Random(content_id("photo-session", seed, agent.name, photo[0]))
            self.root = photo[1]

    def candidates(self) -> Iterator[dict]:
        """Session candidates; ends where a photo's caption gives no first edit."""
        while True:
            cand = self.compose()
            if cand is None:
                return
            yield cand

    def compose(self) -> dict | None:
        s, rng = self.settings, self.rng
        if self.root is None:
            first = next(self.roots)
            root = first["input"]
            turns = [{"edit": first["edit"], "output": first["output"],
                      "operation": first["operation"], "parent": None}]
        else:
            root, turns = self.root, []
            if self._turn(turns, None, root) is None:
                return None
        depth = rng.randint(s.min_turns, s.turns)
        chain = [None, *self._extend(turns, 0, 1, depth)]  # the node at each turn (0: root)
        if s.branches > 1 and rng.random() < s.branch_share:
            at = rng.randrange(0, len(chain) - 1)  # branch below this turn's node
            parent = chain[at]
            caption = root if parent is None else turns[parent]["output"]
            for _ in range(rng.randint(2, s.branches) - 1):
                kid = self._turn(turns, parent, caption)
                if kid is None:
                    break
                self._extend(turns, kid, at + 1, rng.randint(at + 1, depth))
        return {"input": root, "turns": turns}

    def _extend(self, turns: list[dict], node: int, turn: int, depth: int) -> list[int]:
        """Continue a chain from ``node`` (at ``turn``) down to ``depth``; the chain's nodes."""
        path = [node]
        while turn < depth:
            node = self._turn(turns, node, turns[node]["output"])
            if node is None:
                break
            path.append(node)
            turn += 1
        return path

    def _turn(self, turns: list[dict], parent: int | None, caption: str) -> int | None:
        # a photo's caption is edited as the photo path does; a composed one says what is absent
        synthetic = not (parent is None and self.root is not None)
        editor = CaptionEditor(self.agent, self.rng, caption, synthetic=synthetic)
        for _ in range(self.TRIES):
            cand = editor.edit(self.rng.choice(self.ops))
            if cand is not None:
                turns.append({"edit": cand["edit"], "output": cand["output"],
                              "operation": cand["operation"], "parent": parent})
                return len(turns) - 1
        return None


# ------------------------------------------------------------------------------ checking


@dataclass
class SessionChecked:
    """One session line checked: its kept nodes (parents first), or why it went."""

    session_id: str | None = None
    nodes: list[dict] = field(default_factory=list)  # triple, parent (node id), turn, node id
    reason: str | None = None  # the whole line was rejected (not JSON, no turns ...)
    rejected: list[tuple[str, object]] = field(default_factory=list)  # (reason, turn)
    cut: int = 0  # turns under a rejected turn (never checked: their input is not in the data)
    dropped: bool = False  # its kept turns do not reach min_turns
    pending: int = 0  # nodes the partial shard already holds (a resumed run)

    @property
    def depth(self) -> int:
        return max((n["turn"] for n in self.nodes), default=0)

    @property
    def ok(self) -> bool:
        return self.reason is None and not self.dropped and bool(self.nodes)


def check_session(cand: object, agent: Agent, validator: Validator, settings: SessionSettings,
                  recipe: str, index: int, pending: set[str] | None = None,
                  photo_caption: str | None = None,
                  ground: Callable[[dict], str | None] | None = None) -> SessionChecked:
    """Check session line ``index`` of an agent turn by turn (see the module doc).

    A node whose id is in ``pending`` (written before a resumed run's interruption) is taken
    as kept without checking again (the validator remembers it already), leaves ``pending``
    and is marked ``pending`` in the result. ``photo_caption``: the root must be this caption
    (else ``photo_input_changed``) and turn 1 is checked as a photo's triple (the addition
    rule left to the detector, ``ground``: a triple's grounding rejection reason or None).
    """
    pending = pending if pending is not None else set()
    if cand is NOT_JSON:
        return SessionChecked(reason=validator.reject("not_json").reason)
    if not isinstance(cand, dict):
        return SessionChecked(reason=validator.reject("not_object").reason)
    root, turns = cand.get("input"), cand.get("turns")
    if not isinstance(root, str) or not clean_text(root):
        return SessionChecked(reason=validator.reject("missing_field").reason)
    if not isinstance(turns, list) or not turns:
        return SessionChecked(reason=validator.reject("session_no_turns").reason)
    root = clean_text(root)
    if photo_caption is not None and root != clean_text(photo_caption):
        return SessionChecked(reason=validator.reject("photo_input_changed").reason)
    sid = S.session_id(recipe, agent.name, root, index)
    out = SessionChecked(session_id=sid)
    kept: dict[int, dict] = {}  # turn index -> its node
    gone: set[int] = set()  # turn indexes rejected or cut
    kids: Counter = Counter()  # kept children per parent index (None: the root)
    for i, t in enumerate(turns):
        parent = t.get("parent") if isinstance(t, dict) else None
        if isinstance(t, dict) and parent is not None and (
                isinstance(parent, bool) or not isinstance(parent, int)
                or not 0 <= parent < i):
            reason = "session_bad_parent"
        elif parent in gone:
            out.cut += 1
            gone.add(i)
            continue
        elif not isinstance(t, dict):
            reason = "not_object"
        else:
            up = kept.get(parent)
            inp = root if up is None else up["triple"]["output"]
            turn = 1 if up is None else up["turn"] + 1
            given = t.get("input")
            if turn > settings.turns:
                reason = "session_too_deep"
            elif kids[parent] >= settings.branches:
                reason = "session_too_many_branches"
            elif given is not None and (not isinstance(given, str) or clean_text(given) != inp):
                reason = "session_input_mismatch"
            else:
                parent_id = None if up is None else up["node_id"]
                nid = _node_id(recipe, agent, inp, t, sid, parent_id)
                was = nid is not None and nid in pending
                if was:
                    pending.discard(nid)
                    out.pending += 1
                    triple = {"operation": t.get("operation"), "input": inp,
                              "edit": clean_text(t["edit"]), "output": clean_text(t["output"])}
                    reason = None
                else:
                    photo_turn = photo_caption is not None and turn == 1
                    res = validator.check({**{k: t.get(k) for k in ("edit", "output",
                                                                     "operation")},
                                           "input": inp}, agent, grounded=photo_turn)
                    reason, triple = res.reason, res.triple
                    if reason is None and photo_turn and ground is not None:
                        reason = ground(triple)
                        if reason is not None:
                            validator.reject(reason)
                if reason is None:
                    nid = nid or S.node_id(recipe, agent.name, inp, triple["edit"],
                                           triple["output"], sid, parent_id)
                    kept[i] = {"triple": triple, "turn": turn, "node_id": nid,
                               "parent_id": parent_id, "pending": was}
                    kids[parent] += 1
                    out.nodes.append(kept[i])
                    continue
        if reason.startswith("session_") or reason == "not_object":
            validator.reject(reason)
        out.rejected.append((reason, t))
        gone.add(i)
    if out.depth < settings.min_turns:
        out.dropped = True
    return out


def _node_id(recipe: str, agent: Agent, inp: str, turn: dict, sid: str,
             parent: str | None) -> str | None:
    """The id a turn's node would get, None where its fields are not all strings."""
    if not all(isinstance(turn.get(f), str) for f in FIELDS if f != "input"):
        return None
    return S.node_id(recipe, agent.name, inp, clean_text(turn["edit"]),
                     clean_text(turn["output"]), sid, parent)


# ------------------------------------------------------------------------------ counting


@dataclass
class SessionTally:
    """An agent's session counts (reports/captions.json ``sessions``)."""

    target: int  # session turns (nodes) wanted
    streamed: int = 0  # nodes of kept sessions the stream has given (drives the rounds)
    kept: int = 0  # nodes written
    candidates: int = 0  # session lines (or composed sessions)
    requests: int = 0
    sessions: int = 0  # sessions written
    surplus: int = 0  # good sessions that came after the agent's session turns were full
    dropped: int = 0  # sessions whose kept turns do not reach min_turns
    cut: int = 0  # turns under a rejected turn
    trimmed: int = 0  # good turns left off the agent's last session to meet its target
    branches: int = 0  # branch points (nodes, the root included, with more than one child)
    by_length: Counter = field(default_factory=Counter)  # deepest turn -> sessions
    rejected: Counter = field(default_factory=Counter)  # lines and turns, by reason

    def add(self, checked: SessionChecked) -> None:
        """Count a written session."""
        self.sessions += 1
        self.by_length[checked.depth] += 1
        self.branches += sum(1 for c in Counter(n["parent_id"] for n in checked.nodes).values()
                             if c > 1)

    def as_dict(self) -> dict:
        return {"target": self.target, "sessions": self.sessions, "turns": self.kept,
                "by_length": {str(k): v for k, v in sorted(self.by_length.items())},
                "branches": self.branches, "candidates": self.candidates,
                "requests": self.requests, "surplus": self.surplus, "dropped": self.dropped,
                "cut": self.cut, "trimmed": self.trimmed, "rejected": dict(sorted(self.rejected.items()))}


SUMMED = ("target", "sessions", "turns", "branches", "candidates", "requests", "surplus",
          "dropped", "cut", "trimmed")


def merge(tallies: list[dict]) -> dict:
    """One ``sessions`` report from agents' (or ranks') :meth:`SessionTally.as_dict`."""
    total: Counter = Counter()
    by_length: Counter = Counter()
    rejected: Counter = Counter()
    for t in tallies:
        total.update({k: t.get(k, 0) for k in SUMMED})
        by_length.update(t.get("by_length", {}))
        rejected.update(t.get("rejected", {}))
    return {**{k: int(total[k]) for k in SUMMED},
            "by_length": {k: by_length[k] for k in sorted(by_length, key=int)},
            "rejected": dict(sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])))}
