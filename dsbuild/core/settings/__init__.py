"""Per-stage settings models. Each stage owns its module; ``dsbuild.core.config`` assembles them.

Fields listed in a model's ``volatile`` class variable (device, concurrency, batch sizes that
do not change results) are left out of the stage signature, so changing them does not rerun
the stage.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StageSettings(BaseModel):
    """Base for stage settings: unknown keys are errors, volatile keys skip the signature."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    volatile: ClassVar[frozenset[str]] = frozenset()

    def signature_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in self.volatile}
