"""A generator that exists only in the tests: the target is the source with one colour channel
shifted. Registered through dsbuild's generator interface alone (DSBUILD_PLUGINS=colour_shift),
touching no file under dsbuild/.

The source is a smooth random image drawn from the pair's seed (no model), so the plugin
needs nothing but numpy; its own settings are ``generate.colour-shift.*``.
"""

from __future__ import annotations

import random

import numpy as np
from pydantic import BaseModel, Field

from dsbuild.core.generators import Generator, Made, Param, Plan, register
from dsbuild.core.hashing import content_id

NAME = "colour-shift"


class ColourShiftSettings(BaseModel):
    shift: tuple[float, float] = (0.1, 0.5)
    channel: str = Field("red", pattern="^(red|green|blue)$")


class ColourShift:
    """Plans a few shifts per triple (sources shared by the triples of one caption)."""

    def __init__(self, settings, own: ColourShiftSettings, device: str, dtype: str):
        self.s, self.own = settings, own
        self.model = f"colour-shift:{own.channel}"
        self.made = 0

    def plan(self, triple: dict) -> list[Plan]:
        n = self.s.samples_room if triple.get("level") == "room" else self.s.samples_object
        n = min(n, self.s.per_triple) if self.s.per_triple else n
        plans = []
        for i in range(n):
            seed = random.Random(content_id("source", self.s.seed, triple["input"], i)) \
                .randrange(2**31)
            shift = round(random.Random(content_id("shift", triple["id"], i))
                          .uniform(*self.own.shift), 3)
            params = {"shift": shift, "channel": self.own.channel,
                      "height": self.s.height, "width": self.s.width}
            plans.append(Plan(triple, i, content_id(triple["id"], seed, params), seed, params,
                              group=(triple["input"], seed)))
        return plans

    def generate(self, plans: list[Plan]):
        sources: dict[tuple, np.ndarray] = {}
        for p in plans:
            if p.group not in sources:
                rng = np.random.default_rng(p.seed)
                small = rng.random((4, 4, 3))
                big = np.kron(small, np.ones((self.s.height // 4, self.s.width // 4, 1)))
                sources[p.group] = big
            src = sources[p.group]
            target = src.copy()
            c = ("red", "green", "blue").index(p.params["channel"])
            target[..., c] = np.clip(target[..., c] + p.params["shift"], 0, 1)
            self.made += 1
            yield Made(p, src, target, content_id(NAME, *p.group))

    def stats(self) -> dict:
        return {"shifted": self.made}


GENERATOR = register(Generator(
    name=NAME, impl="colour_shift:ColourShift", help="shift one colour channel of the source",
    settings=ColourShiftSettings, extra=None,
    params=(Param("shift", "float", "colour_shift", "added to the channel"),
            Param("channel", "string", description="the shifted channel")),
))
