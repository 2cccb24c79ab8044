"""Sweeps: the P2P parameters of every pair of a triple, drawn deterministically.

``random`` follows InstructPix2Pix: per sample a seed, p ~ U[self_replace] and guidance ~
U[guidance]. The seed and guidance depend on (input caption, sample index) only, so different
edits of one caption share their sources and are batched behind one source branch; the
target-only parameters (p, cross fraction, reweight) depend on the triple. ``grid`` walks
every combination of the grid values for seed after seed.

Sessions (dsbuild.core.sessions): every node of a session is planned with the same draws.
Draw k has one seed and one guidance for the whole run, drawn from the session's id (which
names its root caption) instead of the input caption; a grid walks the full grid for every
node, so draw k is the same (seed, guidance) at every node, whatever its mode. The per-node
P2P parameters (p, cross fraction, reweight) are the node's own, and its edit is aligned from
its input (the parent's caption) to its output. A session pair's id also names its run, since
its image depends on its ancestors' parameters too.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from dsbuild.attention.align import align_prompts
from dsbuild.core import sessions
from dsbuild.core.hashing import content_id
from dsbuild.generate.generators.p2p.sampler import TargetSpec
from dsbuild.generate.settings import GenerateSettings


@dataclass
class PairPlan:
    """One pair to make: its triple, id, seed and recorded P2P params."""

    triple: dict
    index: int
    seed: int
    params: dict
    id: str

    @property
    def group_key(self) -> tuple[str, int, float]:
        return (self.triple["input"], self.seed, self.params["guidance"])

    @property
    def group(self) -> tuple[str, int, float]:
        """Plans of one group share their source image (dsbuild.core.generators.Plan)."""
        return self.group_key

    def target(self) -> TargetSpec:
        p = self.params
        return TargetSpec(
            prompt=self.triple["output"], mode=p["mode"],
            self_replace=p["self_replace"] or 0.0,
            cross_replace=p["cross_replace"] if p["cross_replace"] is not None else 0.0,
            equalizer=p["equalizer"],
            blend_words=tuple(p["blend_words"]) if p["blend_words"] else None,
        )


def samples_for(triple: dict, s: GenerateSettings) -> int:
    """The pairs ``plan_triple`` makes for ``triple`` (the generator's declared ``count``)."""
    n = s.samples_room if triple.get("level") == "room" else s.samples_object
    return min(n, s.per_triple) if s.per_triple else n


def _source_rng(s: GenerateSettings, caption: str, k: int) -> random.Random:
    return random.Random(content_id("source", s.seed, caption, k))


def plan_triple(triple: dict, s: GenerateSettings, tokenizer) -> list[PairPlan]:
    """Every pair of one triple, with the parameters it is made with."""
    mode = s.mode
    al = align_prompts(tokenizer, triple["input"], triple["output"],
                       "auto" if mode in ("auto", "reweight", "self") else mode)
    resolved = al.mode if mode == "auto" else mode
    src_words, tgt_words = al.edit_words()
    blend = [src_words, tgt_words] if s.blend and (src_words or tgt_words) else None
    cross_mode = resolved != "self"
    n = samples_for(triple, s)
    session = triple.get("session_id")
    source_key = session or triple["input"]  # a session's draws are the whole run's
    draws: list[tuple[int, float, float, float | None, float | None]] = []
    if s.sweep == "random":
        for i in range(n):
            srng = _source_rng(s, source_key, i)
            seed = srng.randrange(2**31)
            guidance = round(srng.uniform(*s.guidance), 3)
            trng = random.Random(content_id("target", s.seed, triple["id"], i))
            p = round(trng.uniform(*s.self_replace), 3)
            cross = round(trng.uniform(*s.cross_replace), 3)
            rw = round(trng.uniform(*s.reweight), 3)
            draws.append((seed, guidance, p, cross if cross_mode else None,
                          rw if resolved == "reweight" else None))
    else:
        combos = list(itertools.product(
            s.grid_guidance, s.grid_self_replace,
            s.grid_cross_replace if cross_mode or session else [None],
            s.grid_reweight if resolved == "reweight" or session else [None]))
        for k in itertools.count():
            if len(draws) >= n:
                break
            seed = _source_rng(s, source_key, k).randrange(2**31)
            for g, p, c, rw in combos[: n - len(draws)]:
                draws.append((seed, float(g), float(p), c if cross_mode else None,
                              rw if resolved == "reweight" else None))
    plans = []
    for i, (seed, guidance, p, cross, rw) in enumerate(draws):
        params = {
            "mode": resolved, "steps": s.steps, "guidance": guidance, "cross_replace": cross,
            "self_replace": p, "blend_words": blend,
            "equalizer": {w: rw for w in tgt_words} if rw is not None and tgt_words else None,
            "scheduler": s.scheduler, "height": s.height, "width": s.width,
        }
        if triple.get("photo_id"):  # a real photo: DDIM from its inversion (invert.py)
            params.update(scheduler="ddim", inversion=s.inversion)
        pid = content_id(triple["id"], seed, params)
        if session:  # the run, so two runs' pairs of one node never share an id
            pid = content_id(pid, sessions.run_id(session, seed, guidance, i))
        plans.append(PairPlan(triple, i, seed, params, pid))
    return plans
