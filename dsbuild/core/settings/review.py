"""Settings of review (FiftyOne inspection and Label Studio)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dsbuild.core.settings import StageSettings


class ReviewSettings(StageSettings):
    volatile: ClassVar[frozenset[str]] = frozenset({"url", "reviewer", "session_tasks",
                                                   "queue"})

    dataset_name: str | None = Field(None, description="FiftyOne dataset (default: dsbuild-<build>)")
    project_title: str | None = Field(None, description="Label Studio project title")
    url: str | None = None
    sample_size: int | None = Field(None, ge=1)
    stratify_by: Literal["agent", "level", "operation", "none"] = "agent"
    images: Literal["upload", "local-files"] = "upload"
    seed: int = 0
    overlap: int | None = Field(None, ge=1, description="reviewers per pair in Label Studio "
                                "(the project's annotations per task); unset: the project's "
                                "own setting")
    reviewer: str | None = Field(None, description="reviewer of verdicts given in the FiftyOne "
                                 "plugin when $DSBUILD_REVIEWER is unset (then: $USER)")
    session_tasks: Literal["session", "pair", "both"] = Field(
        "session", description="Label Studio tasks for pairs of multi-turn sessions: one per "
        "session run with a verdict per turn (session), one per pair (pair), or both")
    queue: Literal["export", "all"] = Field(
        "export", description="what review push and FiftyOne's review views hold: the pairs "
        "still headed for the export (export; ordered by how much a verdict is worth), or "
        "every pair the policy shows (all)")
