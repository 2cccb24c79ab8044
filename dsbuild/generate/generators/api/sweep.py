"""The API generator's plans: every pair of a triple, source after source.

A triple's N pairs come from ceil(N / variants) source images of its input caption
(:func:`~dsbuild.generate.generators.source.source_seed`), ``variants`` edit requests each;
the variant number is a parameter, so each is its own request and its own cached reply.
"""

from __future__ import annotations

import itertools

from dsbuild.core.generators import Plan
from dsbuild.core.hashing import content_id
from dsbuild.generate.generators.source import samples_for, source_seed


def count(triple: dict, s) -> int:
    """Pairs a triple gets (no model loaded): the progress bar's total."""
    return samples_for(triple, s)


def request_params(s, own) -> dict:
    """The images.edit parameters besides model, prompt and image."""
    params: dict = {"size": f"{s.width}x{s.height}"}
    if own.quality is not None:
        params["quality"] = own.quality
    if own.response_format is not None:
        params["response_format"] = own.response_format
    if own.extra_body:
        params["extra_body"] = dict(own.extra_body)
    return params


def plan_triple(triple: dict, s, own, source: dict) -> list[Plan]:
    """Every pair of one triple; the group is the source image: (caption, seed)."""
    n, plans = samples_for(triple, s), []
    req = request_params(s, own)
    for k in itertools.count():
        if len(plans) >= n:
            break
        seed = source_seed(s, triple["input"], k)
        for v in range(min(own.variants, n - len(plans))):
            params = {"model": own.model, "size": req["size"], "quality": own.quality,
                      "variant": v, "extra": req.get("extra_body"),
                      "source_model": source["model"], "source_steps": source["steps"],
                      "source_guidance": source["guidance"], "height": s.height,
                      "width": s.width}
            plans.append(Plan(triple, len(plans), content_id(triple["id"], seed, params),
                              seed, params, group=(triple["input"], seed)))
    return plans
