"""Settings of the leak-free train/test split (``dsbuild.core.split``), shared by augment and export."""

from __future__ import annotations

from pydantic import Field

from dsbuild.core.settings import StageSettings


class SplitSettings(StageSettings):
    test_ratio: float = Field(0.1, ge=0, lt=1, description="share of rows in the test split")
    seed: int = Field(0, description="seed of the group order")
