"""A judge's rubric: the criteria a vision-language model scores (0-10 each), their weights,
optional per-criterion minimums and a threshold on the weighted score.

A rubric is named (a preset of :data:`PRESETS`) or written out as criteria in the config::

    verify:
      judge:
        rubric: pico-banana                 # or a list:
        # rubric:
        #   - {name: instruction, description: "...", weight: 0.5, min: 6}
        #   - {name: quality, description: "...", weight: 0.5}
        threshold: 0.7                      # on the weighted score in [0, 1]; unset: the preset's

The weighted score is ``sum(w_i * s_i) / (10 * sum(w_i))`` in [0, 1]. A pair passes the judge
when every criterion with a minimum reaches it and the weighted score reaches the threshold.
``dsbuild`` (the default) is the judge's original three items with their minimums
(``instruction_min``, ``preserve_min``, ``quality_min``) and no threshold; ``pico-banana``
is Pico-Banana-400K's weighted four-item rubric (instruction compliance 40 %, realism 25 %,
preservation 20 %, technical quality 15 %, threshold 0.7).

This module sits in the llm layer so that every judge (verify's, eval's suites) reads one
definition.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field, field_validator

from dsbuild.core.hashing import content_id

NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Criterion(BaseModel):
    """One rubric item: the reply field ``name`` holds its 0-10 score."""

    name: str = Field(description="the reply's field (lower case, digits, underscores)")
    description: str = Field(description="what the judge scores, in one sentence")
    weight: float = Field(1.0, gt=0, description="its share of the weighted score")
    min: int | None = Field(None, ge=0, le=10, description="a pair below this fails the judge")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v) or v == "reason":
            raise ValueError(f"criterion name {v!r}: use lower-case letters, digits and "
                             "underscores, starting with a letter (and not 'reason')")
        return v


def _c(name: str, description: str, weight: float = 1.0, min: int | None = None) -> Criterion:
    return Criterion(name=name, description=description, weight=weight, min=min)


# preset name -> (criteria, threshold on the weighted score)
PRESETS: dict[str, tuple[tuple[Criterion, ...], float]] = {
    "dsbuild": ((
        _c("instruction", "how fully the edited image carries out the instruction"),
        _c("preserve", "how well everything the instruction does not mention stayed the same "
           "(10: nothing else changed)"),
        _c("quality", "how natural and free of artefacts the edited image is"),
    ), 0.0),
    "pico-banana": ((
        _c("instruction", "instruction compliance: how fully and exactly the edited image "
           "carries out the instruction", 0.40),
        _c("realism", "how realistic and physically plausible the edited image is (lighting, "
           "shadows, perspective, materials)", 0.25),
        _c("preservation", "how well the parts of the image the instruction does not mention "
           "are preserved (identity, layout, background)", 0.20),
        _c("technical", "technical quality: sharpness, no artefacts, seams or distortions", 0.15),
    ), 0.7),
}


@dataclass(frozen=True)
class Rubric:
    """A resolved rubric: its name (a preset's, or ``custom``), criteria and threshold."""

    name: str
    criteria: tuple[Criterion, ...]
    threshold: float
    # the integer scale each criterion is scored on (ImgEdit-Bench's judge scores 1-5)
    scale: tuple[int, int] = (0, 10)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.criteria)

    def as_dict(self) -> dict:
        d = {"name": self.name, "threshold": self.threshold,
             "criteria": [c.model_dump() for c in self.criteria]}
        if self.scale != (0, 10):  # rubrics on the 0-10 scale keep the hash they always had
            d["scale"] = list(self.scale)
        return d

    @property
    def hash(self) -> str:
        """Names the rubric in judge records: criteria, weights, minimums, threshold."""
        return content_id("rubric", self.as_dict())

    def weighted(self, scores: Mapping[str, float]) -> float:
        """The weighted score in [0, 1] of a complete set of scores on the rubric's scale
        (``sum(w_i * (s_i - lo)) / ((hi - lo) * sum(w_i))``; on 0-10 that is the formula above)."""
        lo, hi = self.scale
        total = sum(c.weight for c in self.criteria)
        return (sum(c.weight * (float(scores[c.name]) - lo) for c in self.criteria)
                / ((hi - lo) * total))

    def failed(self, scores: Mapping[str, float]) -> str | None:
        """The first criterion below its minimum (its name), ``weighted`` when the weighted
        score is under the threshold, else None (the pair passes the judge)."""
        for c in self.criteria:
            if c.min is not None and scores[c.name] < c.min:
                return c.name
        if self.weighted(scores) < self.threshold:
            return "weighted"
        return None


def judge_record(rubric: Rubric, *, model_requested: str, model_reported: str | None,
                 prompt_hash: str, temperature: float, raw: str | None,
                 scores: Mapping[str, int] | None, reason: str | None = None,
                 missing: str | None = None) -> dict:
    """A judge record (:class:`dsbuild.core.schema.Judge`): identity, raw reply, parsed scores,
    the weighted score and verdict, or ``missing`` (its reason) with no score and no verdict."""
    ok = scores is not None and missing is None
    failed = rubric.failed(scores) if ok else None
    return {"model_requested": model_requested, "model_reported": model_reported,
            "rubric": rubric.name, "rubric_hash": rubric.hash, "prompt_hash": prompt_hash,
            "temperature": temperature, "raw": raw,
            "scores": {k: scores[k] for k in rubric.names} if ok else None,
            "score": round(rubric.weighted(scores), 4) if ok else None,
            "threshold": rubric.threshold, "passed": (failed is None) if ok else None,
            "failed": failed, "reason": reason, "missing": None if ok else (missing or "no_reply")}


def resolve(rubric: str | Sequence[Criterion | Mapping], threshold: float | None = None,
            minimums: Mapping[str, int] | None = None, scale: tuple[int, int] = (0, 10)
            ) -> Rubric:
    """The rubric a setting names: a preset (its ``minimums`` by criterion name override the
    preset's, as verify.judge's ``*_min`` settings do for ``dsbuild``) or written-out criteria;
    ``threshold`` (None: the preset's, 0 for custom criteria); ``scale`` the integer range of
    written-out criteria (presets score 0-10)."""
    if isinstance(rubric, str):
        if rubric not in PRESETS:
            raise ValueError(f"unknown rubric {rubric!r}: use one of {', '.join(PRESETS)} or "
                             "write its criteria out as a list")
        criteria, default = PRESETS[rubric]
        mins = dict(minimums or {})
        criteria = tuple(c.model_copy(update={"min": mins[c.name]}) if c.name in mins else c
                         for c in criteria)
        return Rubric(rubric, criteria, default if threshold is None else float(threshold))
    crit = tuple(c if isinstance(c, Criterion) else Criterion.model_validate(c) for c in rubric)
    if not crit:
        raise ValueError("a rubric needs at least one criterion")
    names = [c.name for c in crit]
    if len(set(names)) != len(names):
        raise ValueError(f"rubric criteria must have distinct names (got {names})")
    lo, hi = scale
    if hi <= lo or any(c.min is not None and not lo <= c.min <= hi for c in crit):
        raise ValueError(f"a rubric's scale must rise ({lo}-{hi}) and hold every minimum")
    return Rubric("custom", crit, 0.0 if threshold is None else float(threshold),
                  (int(lo), int(hi)))
