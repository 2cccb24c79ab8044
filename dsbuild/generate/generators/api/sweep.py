"""The API generator's plans: every pair of a triple, source after source.

A triple's N pairs come from ceil(N / variants) source images of its input caption
(:func:`~dsbuild.generate.generators.source.source_seed`), ``variants`` edit requests each;
the variant number is a parameter, so each is its own request and its own cached reply.
With ``generate.api.n`` > 1 a source's variants are asked ``n`` at a time: a pair records
``n`` (the images its request asks for) and ``n_index`` (which of them is its own), fixed by
the settings alone, so a resumed run asks the same requests and the cache answers them.

A session node draws from its session (:func:`~dsbuild.generate.generators.turns.draw_key`):
the k-th pair of every node is one run with one source seed and variant. Each turn is its own
request on its parent's output (``n`` does not apply: a run's turns never share a request).
"""

from __future__ import annotations

import itertools

from dsbuild.core.generators import Plan
from dsbuild.core.hashing import content_id
from dsbuild.generate.generators import turns
from dsbuild.generate.generators.source import samples_for, source_group, source_seed


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
    req, key = request_params(s, own), turns.draw_key(triple)
    group = turns.session_group if key is not triple else source_group
    for k in itertools.count():
        if len(plans) >= n:
            break
        seed = source_seed(s, key["input"], k)
        count = min(own.variants, n - len(plans))
        for v in range(count):
            params = {"model": own.model, "size": req["size"], "quality": own.quality,
                      "variant": v, "extra": req.get("extra_body"),
                      "source_model": source["model"], "source_steps": source["steps"],
                      "source_guidance": source["guidance"], "height": s.height,
                      "width": s.width}
            if own.n > 1 and key is triple:  # absent at n=1: pair ids as before n existed
                start = v - v % own.n
                params.update(n=min(own.n, count - start), n_index=v - start)
            plans.append(Plan(triple, len(plans), content_id(triple["id"], seed, params),
                              seed, params, group=group(triple, seed)))
    return plans
