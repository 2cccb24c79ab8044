"""Settings of the generate stage: which generator, on what model, how many pairs per triple.

``generate.generator`` (default ``p2p``) picks a generator declared through
:mod:`dsbuild.core.generators`. Prompt-to-Prompt's own settings are this section's top-level
keys (:class:`P2PSettings`, inherited), as in builds made before generate had other
generators; any other generator's settings are the sub-section named after it
(``generate.<name>.<key>``), validated by its own settings model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_serializer,
    model_validator,
)

from dsbuild.core import generators
from dsbuild.core import model_ids as ids
from dsbuild.core.deprecation import notice
from dsbuild.core.errors import DsbuildError
from dsbuild.core.settings import StageSettings
from dsbuild.generate.generators.p2p.settings import P2PSettings


class SharedSettings(StageSettings):
    """What every generator reads: the model, image size, sweep size, seed."""

    generator: str = Field(generators.DEFAULT, description="the generator that makes the "
                           "pairs (p2p: Prompt-to-Prompt; editor: a diffusers editing "
                           "pipeline on a generated source; api: an images-edit endpoint "
                           "on a generated source; a plugin's name)")
    # SD 1.5, as InstructPix2Pix made its data with; 'tiny' = random weights (offline demos)
    model: str = Field(ids.SD,
                       description="the generator's model: a diffusers dir or Hub id (p2p: SD "
                       "1.x/2.x or SDXL, or tiny-sdxl; editor: an editing pipeline, or tiny-ip2p / "
                       "tiny-sdxl-ip2p / tiny-kontext; "
                       "api: the text-to-image model of the source images), or 'tiny'")
    steps: int = Field(50, ge=1)
    height: int = Field(512, ge=8)
    width: int = Field(512, ge=8)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 on CUDA, fp32 elsewhere")
    device: str = "auto"
    batch_size: int = Field(8, ge=2, description="images per batch (p2p: sources + targets "
                            "in one UNet batch; editor: edits)")
    samples_object: int = Field(30, ge=1)
    samples_room: int = Field(50, ge=1)
    per_triple: int | None = Field(None, ge=1, description="cap on pairs per triple (demo "
                                   "builds)")
    seed: int = 0
    contact_sheet: int = Field(3, ge=0, description="pairs per agent on the contact sheet")

    @property
    def limit(self) -> int | None:
        """``per_triple``'s old name, for generator plugins written before the rename."""
        notice("GenerateSettings.limit", "GenerateSettings.per_triple")
        return self.per_triple


class GenerateSettings(P2PSettings, SharedSettings):
    """The generate section: the shared settings first, then P2P's, then other generators'
    sections (``generate.<name>``, kept in ``sections`` and written back at the top)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    volatile: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "contact_sheet"})
    renamed: ClassVar[dict[str, str]] = {"limit": "per_triple"}

    sections: dict[str, Any] = Field(default_factory=dict, description="other generators' "
                                     "own settings by generator name (generate.<name>.KEY)")
    mix: list[dict[str, Any] | str] = Field(
        default_factory=list, description="more generators in the same build: each entry a "
        "generator name or a partial generate section (generator, model, steps, its own "
        "<name> section, ...) over this one")

    @model_validator(mode="before")
    @classmethod
    def _gather_sections(cls, data: Any) -> Any:
        """``generate.<generator>: {...}`` keys go to ``sections``; any other unknown key stays
        and is refused as an unknown key."""
        if isinstance(data, dict):
            found = {k: v for k, v in data.items()
                     if k not in cls.model_fields and k in generators.names()}
            if found:
                data = {k: v for k, v in data.items() if k not in found}
                data["sections"] = {**(data.get("sections") or {}), **found}
        return data

    @model_validator(mode="after")
    def _generator_sections(self) -> GenerateSettings:
        try:
            gen = generators.get(self.generator)  # an unknown name fails with the known ones
        except DsbuildError as exc:
            raise ValueError(str(exc)) from None
        sections = dict(self.sections)
        for name, value in sections.items():
            own = generators.get(name).settings if name in generators.names() else None
            if own is None or name == generators.DEFAULT:
                raise ValueError(f"{name!r} is not a generator with its own settings")
            if not isinstance(value, own):
                try:
                    sections[name] = own.model_validate(value or {})
                except ValidationError as exc:
                    raise ValueError("; ".join(
                        f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                        for e in exc.errors())) from None
        if gen.name != generators.DEFAULT and gen.settings is not None \
                and gen.name not in sections:
            sections[gen.name] = gen.settings()
        if sections != self.sections:
            self.__dict__["sections"] = sections  # no re-validation loop
        self.runs()  # every mix entry validates now, naming the entry that does not
        return self

    def runs(self) -> list[GenerateSettings]:
        """The generator runs of this section: itself, then each ``mix`` entry merged over it
        (an entry inherits every key it does not set; a generator's own section merges key by
        key). A generator on one model runs once."""
        if not self.mix:
            return [self]
        base = self.model_dump(mode="json")
        base.pop("mix", None)
        out, seen = [self.model_copy(update={"mix": []})], {(self.generator, self.model)}
        for i, entry in enumerate(self.mix):
            entry = {"generator": entry} if isinstance(entry, str) else dict(entry)
            if "mix" in entry:
                raise ValueError(f"mix[{i}]: an entry holds no mix of its own")
            merged = dict(base)
            for key, value in entry.items():
                key = self.renamed.get(key, key)
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    value = {**merged[key], **value}
                merged[key] = value
            try:
                run = GenerateSettings.model_validate(merged)
            except ValidationError as exc:
                raise ValueError("; ".join(
                    f"mix[{i}].{'.'.join(map(str, e['loc']))}: "
                    f"{e['msg'].removeprefix('Value error, ')}".replace(".: ", ": ")
                    for e in exc.errors())) from None
            if (run.generator, run.model) in seen:
                raise ValueError(f"mix[{i}]: generator {run.generator} on model {run.model} "
                                 "is already in this build; give each entry another "
                                 "generator or model")
            seen.add((run.generator, run.model))
            out.append(run)
        return out

    def labels(self) -> list[str]:
        """Each run's name in stats, reports and the card: its generator, ``generator:model``
        where the build runs that generator on more than one model."""
        runs = self.runs()
        names = [r.generator for r in runs]
        return [r.generator if names.count(r.generator) == 1 else f"{r.generator}:{r.model}"
                for r in runs]

    @model_serializer(mode="wrap")
    def _sections_at_the_top(self, handler) -> dict[str, Any]:
        data = handler(self)
        data.update(data.pop("sections", None) or {})
        if not data.get("mix", True):
            data.pop("mix")  # builds that mix nothing keep dsbuild.yaml and signatures as before
        return data

    def section(self, name: str) -> BaseModel | None:
        """A generator's own settings (p2p: these settings themselves)."""
        if name == generators.DEFAULT:
            return self
        return self.sections.get(name)

    def signature_dict(self) -> dict[str, Any]:
        """P2P builds sign as they did before generators existed (no ``generator`` key); another
        generator signs its name, its section and the shared settings, not P2P's."""
        data = super().signature_dict()
        if self.mix:  # each run signs as it would alone
            data.pop("mix", None)
            return {**self.model_copy(update={"mix": []}).signature_dict(),
                    "mix": [run.signature_dict() for run in self.runs()[1:]]}
        if self.generator == generators.DEFAULT:
            data.pop("generator", None)
            return self.p2p_signature(data)
        for key in P2PSettings.model_fields:
            data.pop(key, None)
        for name in self.sections:
            if name != self.generator:
                data.pop(name, None)
        own = self.sections.get(self.generator)
        if isinstance(own, StageSettings):  # its transport knobs (concurrency ...) skip it too
            data[self.generator] = own.signature_dict()
        return data
