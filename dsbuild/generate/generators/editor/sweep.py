"""The editor's sweep: every pair of a triple, its seed and knobs, drawn deterministically.

A seed is one source image (the input caption made by the source model), shared by every
variant and by every triple of the same caption: the seed of a triple's k-th source depends
on (settings seed, input caption, k) only. ``random`` draws ``variants`` knob settings per
source from (settings seed, triple id, k, variant); ``grid`` makes every combination of the
grid values per source, source after source, until the triple has its N pairs.

A session node (dsbuild.core.sessions) draws from its session instead of its own id and caption
(:func:`~dsbuild.generate.generators.turns.draw_key`): the k-th draw is the same seed and knobs
for every node, one run of the session (its root image made from the root caption).
"""

from __future__ import annotations

import itertools
import random

from dsbuild.core.generators import Plan
from dsbuild.core.hashing import content_id
from dsbuild.generate.generators import turns
from dsbuild.generate.generators.source import samples_for, source_group, source_seed

__all__ = ["plan_triple", "samples_for", "source_seed"]


def _draws(triple: dict, s, own, knobs: dict, n: int) -> list[tuple[int, float, float | None]]:
    """(seed, guidance, image guidance or None) for each of the triple's n pairs."""
    ig_on = knobs["image_guidance"] is not None
    out: list[tuple[int, float, float | None]] = []
    if own.sweep == "grid":
        combos = list(itertools.product(knobs["grid_guidance"],
                                        knobs["grid_image_guidance"] if ig_on else [None]))
        per = len(combos)
    else:
        per = own.variants
    for k in itertools.count():
        if len(out) >= n:
            break
        seed = source_seed(s, triple["input"], k)
        for v in range(min(per, n - len(out))):
            if own.sweep == "grid":
                g, ig = combos[v]
                out.append((seed, float(g), None if ig is None else float(ig)))
                continue
            rng = random.Random(content_id("editor", s.seed, triple["id"], k, v))
            g = round(rng.uniform(*knobs["guidance"]), 3)
            ig = round(rng.uniform(*knobs["image_guidance"]), 3) if ig_on else None
            out.append((seed, g, ig))
    return out


def plan_triple(triple: dict, s, own, pipeline: str, knobs: dict, source: dict) -> list[Plan]:
    """Every pair of one triple. ``source`` holds the source image's settings (model, steps,
    guidance), recorded with the knobs; the group is the source image: (caption, seed)."""
    plans, key = [], turns.draw_key(triple)
    group = turns.session_group if key is not triple else source_group
    for i, (seed, g, ig) in enumerate(_draws(key, s, own, knobs, samples_for(triple, s))):
        params = {"pipeline": pipeline, "steps": s.steps, "guidance": g, "image_guidance": ig,
                  "source_model": source["model"], "source_steps": source["steps"],
                  "source_guidance": source["guidance"], "height": s.height,
                  "width": s.width}
        plans.append(Plan(triple, i, content_id(triple["id"], seed, params), seed, params,
                          group=group(triple, seed)))
    return plans
