"""Settings of the generate stage: which generator, on what model, how many pairs per triple.

``generate.generator`` (default ``p2p``) picks a generator declared through
:mod:`dsbuild.core.generators`. Prompt-to-Prompt's own settings are this section's top-level
keys (:class:`P2PSettings`, inherited), as in builds made before generate had other
generators; any other generator's settings are the sub-section named after it
(``generate.<name>.<key>``), validated by its own settings model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dsbuild.core import generators
from dsbuild.core.errors import DsbuildError
from dsbuild.core.settings import StageSettings
from dsbuild.generate.generators.p2p.settings import P2PSettings
from dsbuild.models import ids


class SharedSettings(StageSettings):
    """What every generator reads: the model, image size, sweep size, seed."""

    generator: str = Field(generators.DEFAULT, description="the generator that makes the "
                           "pairs (p2p: Prompt-to-Prompt; a plugin's name)")
    # SD 1.5, as InstructPix2Pix made its data with; 'tiny' = random weights (offline demos)
    model: str = Field(ids.SD,
                       description="the generator's model: a diffusers dir or Hub id (p2p: SD "
                       "1.x/2.x), or 'tiny'")
    steps: int = Field(50, ge=1)
    height: int = Field(512, ge=8)
    width: int = Field(512, ge=8)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 on CUDA, fp32 elsewhere")
    device: str = "auto"
    batch_size: int = Field(8, ge=2, description="images per UNet batch (sources + targets)")
    samples_object: int = Field(30, ge=1)
    samples_room: int = Field(50, ge=1)
    limit: int | None = Field(None, ge=1, description="cap on samples per triple (demo builds)")
    seed: int = 0
    contact_sheet: int = Field(3, ge=0, description="pairs per agent on the contact sheet")


class GenerateSettings(P2PSettings, SharedSettings):
    """The generate section: the shared settings first, then P2P's, then other generators'
    sections."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    volatile: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "contact_sheet"})

    @model_validator(mode="after")
    def _generator_sections(self) -> GenerateSettings:
        try:
            gen = generators.get(self.generator)  # an unknown name fails with the known ones
        except DsbuildError as exc:
            raise ValueError(str(exc)) from None
        for name, value in (self.model_extra or {}).items():
            if name not in generators.names():
                raise ValueError(f"unknown setting {name!r} (not a generate setting nor a "
                                 "generator's section)")
            own = generators.get(name).settings
            if own is None or name == generators.DEFAULT:
                raise ValueError(f"generator {name!r} has no settings section")
            if not isinstance(value, BaseModel):
                try:
                    self.__pydantic_extra__[name] = own.model_validate(value or {})
                except ValidationError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        if gen.name != generators.DEFAULT and gen.settings is not None \
                and gen.name not in (self.model_extra or {}):
            self.__pydantic_extra__[gen.name] = gen.settings()
        return self

    def section(self, name: str) -> BaseModel | None:
        """A generator's own settings (p2p: these settings themselves)."""
        if name == generators.DEFAULT:
            return self
        return (self.model_extra or {}).get(name)

    def signature_dict(self) -> dict[str, Any]:
        """P2P builds sign as they did before generators existed (no ``generator`` key); another
        generator signs its name, its section and the shared settings, not P2P's."""
        data = super().signature_dict()
        if self.generator == generators.DEFAULT:
            data.pop("generator", None)
            return self.p2p_signature(data)
        for key in P2PSettings.model_fields:
            data.pop(key, None)
        for name in self.model_extra or {}:
            if name != self.generator:
                data.pop(name, None)
        return data
