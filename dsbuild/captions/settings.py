"""Settings of the captions stage (LLM agents or the offline template backend)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from dsbuild.core.settings import StageSettings
from dsbuild.llm.settings import TRANSPORT, LLMSettings


class PhotoCaptionSettings(StageSettings):
    """Triples written from the build's photos (the sources stage) and the grounding check run
    on each photo before generation (docs/captions.md "From photos")."""

    volatile: ClassVar[frozenset[str]] = frozenset({"device"})

    per_photo: int = Field(4, ge=1, description="triples written from each photo")
    ground: bool = Field(True, description="check each triple's targets with the detector on "
                         "the photo: removed/replaced/changed things detected, added ones not")
    detector: str = Field("auto", description="OWLv2/OWL-ViT of the grounding check; 'auto' = "
                          "verify.detector", json_schema_extra={"loads": "owl"})
    present_min: float = Field(0.2, ge=0, le=1, description="detector score at which a "
                               "removed/replaced/changed thing counts as in the photo")
    absent_max: float = Field(0.1, ge=0, le=1, description="score at or below which an added "
                              "thing counts as absent from the photo")
    device: str = "auto"


class SessionSettings(StageSettings):
    """Multi-turn edit sessions (docs/sessions.md): a share of each agent's triples come as
    sessions, chains (or trees) of edits from one input caption, each edit valid against the
    caption it applies to."""

    share: float = Field(0.0, ge=0, le=1, description="share of each agent's triples that are "
                         "turns of sessions (0 = single edits only)")
    turns: int = Field(3, ge=2, le=5, description="most turns (edits along one path) of a "
                       "session")
    min_turns: int = Field(2, ge=1, le=5, description="fewest turns of a session; a session "
                           "the agent cannot take this far is dropped (counted)")
    branches: int = Field(1, ge=1, le=4, description="most edits branching from one node (1 = "
                          "chains)")
    branch_share: float = Field(0.0, ge=0, le=1, description="share of sessions that are trees "
                                "(a node branches into 2..branches edits)")

    @model_validator(mode="after")
    def _turns_at_least_min(self):
        if self.min_turns > self.turns:
            raise ValueError(f"captions.sessions.min_turns={self.min_turns} is more than "
                             f"captions.sessions.turns={self.turns}: lower min_turns or raise "
                             "turns")
        return self


class CaptionsSettings(LLMSettings):
    """The endpoint settings (``model``, ``base_url``, retries ...) come from LLMSettings."""

    # what counts as done, not what is written: changing it keeps the partial shard
    volatile: ClassVar[frozenset[str]] = TRANSPORT | {"min_share"}
    renamed: ClassVar[dict[str, str]] = {"limit": "per_agent"}

    backend: Literal["auto", "template", "openai"] = Field(
        "auto", description="auto = openai when an endpoint is configured, else template"
    )
    seed: int = 0
    per_agent: int | None = Field(None, ge=1, description="cap on triples per agent (demo "
                                  "builds)")
    count_scale: float = Field(1.0, gt=0, description="multiply every agent's target count")
    per_request: int = Field(10, ge=1, le=100, description="triples asked for per request")
    max_rounds: int = Field(
        0, ge=0, description="request rounds per agent before giving up (0 = auto: 8)"
    )
    min_share: float = Field(
        0.5, ge=0, le=1, description="a rank that keeps less than this share of its target "
        "(or nothing at all) fails: exit 1, no completion marker, the partial shard kept"
    )
    # validator
    max_changed_fraction: float = Field(
        0.6, gt=0, le=1, description="max share of output words that may differ from input"
    )
    max_diff_spans: int = Field(2, ge=1, description="max separate changed spans input→output")
    photos: PhotoCaptionSettings = Field(default_factory=PhotoCaptionSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)

    def signature_dict(self) -> dict[str, Any]:
        """The photo and session settings sign only where they differ from their defaults, so a
        build made before photos or sessions existed keeps its signature (a build with photos
        also signs the sources stage it read)."""
        data = super().signature_dict()
        for name, default in (("photos", PhotoCaptionSettings()),
                              ("sessions", SessionSettings())):
            own = getattr(self, name).signature_dict()
            if own == default.signature_dict():
                data.pop(name, None)
            else:
                data[name] = own
        return data
