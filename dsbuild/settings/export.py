"""Settings of export and push."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsbuild.settings import StageSettings


class ExportSettings(StageSettings):
    test_ratio: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    policy: Literal["kept", "accepted"] = "kept"
    license: str = "cc-by-4.0"
