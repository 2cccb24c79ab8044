"""Per-stage settings models. Each stage owns its module; ``dsbuild.core.config`` assembles them.

Fields listed in a model's ``volatile`` class variable (device, concurrency, batch sizes that
do not change results) are left out of the stage signature, so changing them does not rerun
the stage. Keys listed in ``renamed`` (old key -> new key) are still read for one release,
with ``old_values`` mapping an old value onto its new spelling; a stage signs a renamed field
under its old key and value, so a build made before the rename stays done.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, model_validator

Precision = Literal["auto", "fp32", "fp16", "bf16"]  # --precision: auto is fp16 on CUDA
PRECISIONS: tuple[str, ...] = get_args(Precision)


class StageSettings(BaseModel):
    """Base for stage settings: unknown keys are errors, volatile keys skip the signature."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    volatile: ClassVar[frozenset[str]] = frozenset()
    renamed: ClassVar[dict[str, str]] = {}  # old key -> new key
    old_values: ClassVar[dict[str, dict[Any, Any]]] = {}  # new key -> {old value: new value}

    @model_validator(mode="before")
    @classmethod
    def _read_old_names(cls, data: Any) -> Any:
        return cls.upgrade(data) if isinstance(data, dict) else data

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` with its old keys (and old values) under their new names; an old key
        given beside its new one with another value is an error."""
        data = dict(data)
        for old, new in cls.renamed.items():
            if old in data:
                value = data.pop(old)
                if new in data and data[new] != value:
                    raise ValueError(f"{old} (the old name of {new}) and {new} disagree "
                                     f"({value!r} vs {data[new]!r}); keep only {new}")
                data[new] = value
        for key, values in cls.old_values.items():
            value = data.get(key)
            if isinstance(value, str | int | float | bool) and value in values:
                data[key] = values[value]
        return data

    def signature_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data = {k: v for k, v in data.items() if k not in self.volatile}
        for old, new in self.renamed.items():  # signed as before the rename
            if new in data:
                back = {v: o for o, v in self.old_values.get(new, {}).items()}
                value = data.pop(new)
                data[old] = back.get(value, value) if isinstance(value, str | int) else value
        return data
