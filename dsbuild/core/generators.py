"""Generator declarations: what the generate stage can run to turn triples into image pairs.

A generator is to the generate stage what a stage is to the pipeline: one module and one
:func:`register` call. A :class:`Generator` names its implementation (``"module:attr"``,
imported only when a build generates, so declaring one never imports torch), its own settings
model (the ``generate.<name>`` section of dsbuild.yaml; the built-in ``p2p`` keeps its settings
at the top of ``generate`` as builds made before generators existed have them) and the
parameters it records in every pair's ``params``, which export, FiftyOne, Label Studio and the
dataset card show without knowing which generator made the pair.

The implementation is a class built once per worker as ``impl(settings, own, device, dtype)``
(``settings``: the generate stage's settings, ``own``: the generator's own settings model or
None) that loads its models through :mod:`dsbuild.models` and offers:

- ``model``: the model name pairs record;
- ``plan(triple) -> list[Plan]``: its sweep, every pair of one triple with its id, seed and
  parameters (ids are content hashes, so re-running never duplicates a pair);
- ``generate(plans) -> Iterator[Made]``: the images, batching plans that share work (P2P
  shares one source branch per (caption, seed, guidance)) however it likes;
- ``stats() -> dict``: counters for the stage's marker (may be empty); ``captions_cut`` and
  ``token_limit`` (:mod:`dsbuild.core.quiet`) are the captions its text encoder cut, which the
  stage reports in one line and in reports/generate.json.

A generator that pays per request may also offer ``use_cache(folder)``: the stage calls it
with a folder of the build's cache (``cache/generate/<name>``) before ``generate``, so a re-run
or a resumed run asks for nothing twice.

A generator may also declare ``count``: ``"module:function"(triple, settings) -> int``, the
number of plans ``plan(triple)`` makes, known without loading a model, so the driver's progress
bar over several workers has its total before the first shard starts.

Built-ins live in ``dsbuild/generate/generators/``; plugins register from their own module,
found through the ``dsbuild.generators`` entry-point group or ``DSBUILD_PLUGINS``.
See docs/architecture.md, "Add a generator".
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from dsbuild.core.errors import DsbuildError

DEFAULT = "p2p"
BUILTIN = ("dsbuild.generate.generators.p2p", "dsbuild.generate.generators.editor",
           "dsbuild.generate.generators.api", "dsbuild.generate.generators.inpaint")
ParamType = Literal["string", "int", "float", "bool", "json"]


@dataclass(frozen=True)
class Param:
    """A parameter a generator records in ``pair["params"]``, and how readers show it.

    ``column`` is its one name in export columns, FiftyOne fields, Label Studio task data and
    the card (default: ``name``); ``json`` values are shown as canonical JSON text. ``role``
    lets a reader find a meaning without knowing the generator (:func:`by_role`).
    """

    name: str
    type: ParamType = "string"
    column: str | None = None
    description: str = ""
    # what the value means to readers that know no generator ("edit_words": the (source
    # words, target words) the edit changes, which verify looks for)
    role: str | None = None

    @property
    def field(self) -> str:
        return self.column or self.name

    def value(self, params: dict) -> Any:
        """This parameter of a pair's ``params``, converted to its declared type."""
        v = params.get(self.name)
        if v is None:
            return None
        if self.type == "json":
            return json.dumps(v, sort_keys=True, default=str)
        return {"string": str, "int": int, "float": float, "bool": bool}[self.type](v)


@dataclass(frozen=True)
class Plan:
    """One pair to make: its triple, index in the triple's sweep, id, seed and parameters.

    Plans with the same ``group`` share work (e.g. one source image); a generator may keep
    anything else it needs in ``extra``.
    """

    triple: dict
    index: int
    id: str
    seed: int
    params: dict
    group: tuple = ()
    extra: Any = None


@dataclass
class Made:
    """What a generator made for one plan: float images H x W x 3 in [0, 1], the mask of what
    it let change (H x W bool) where it has one, and the id of the source image it shares;
    ``images``: more images by name (written as ``<pair>_<name>.png``, recorded in
    ``images.<name>``), ``record``: more pair-record fields (a photo's ``photo_id``, ...)."""

    plan: Plan
    source: Any
    target: Any
    source_id: str
    mask: Any = None
    images: dict[str, Any] | None = None
    record: dict[str, Any] | None = None


@dataclass(frozen=True)
class Generator:
    """One generator, declared once."""

    name: str
    impl: str  # "module:attr" of the implementation class
    help: str
    params: tuple[Param, ...] = ()
    settings: type[BaseModel] | None = None  # the generate.<name> section (None: no section)
    extra: str | None = "gen"  # pip extra its implementation needs
    model: str | None = None  # kind of model generate.model names (dsbuild.models.available)
    count: str | None = None  # "module:function"(triple, settings) -> pairs plan(triple) makes

    def load_impl(self) -> Callable:
        from dsbuild.core import deps

        deps.check(self.extra, what=f"generator {self.name}")
        return deps.load_target(self.impl, what=f"generator {self.name}")

    def columns(self) -> dict[str, Param]:
        return {p.field: p for p in self.params}


_REGISTRY: dict[str, Generator] = {}
_loaded = False


def register(gen: Generator, *, replace: bool = False) -> Generator:
    """Add a generator (built-in, plugin or test)."""
    if gen.name in _REGISTRY and not replace:
        raise DsbuildError(f"generator {gen.name!r} is already registered")
    if gen.name in RESERVED:
        raise DsbuildError(f"{gen.name!r} is a generate setting, not a generator name")
    _REGISTRY[gen.name] = gen
    return gen


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def load() -> None:
    """Import the built-in generators, then plugins (``dsbuild.generators`` entry points and
    ``DSBUILD_PLUGINS``, which also holds stage plugins), once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        importlib.import_module(name)
    for name in [m.strip() for m in os.environ.get("DSBUILD_PLUGINS", "").split(",")]:
        if name:
            importlib.import_module(name)
    from importlib.metadata import entry_points

    for ep in entry_points(group="dsbuild.generators"):
        obj = ep.load()
        if isinstance(obj, Generator) and obj.name not in _REGISTRY:
            register(obj)


def get(name: str) -> Generator:
    load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DsbuildError(f"unknown generator {name!r}: set generate.generator to one of "
                           f"{', '.join(sorted(_REGISTRY))} (a plugin generator registers "
                           "itself; is its module in DSBUILD_PLUGINS?)") from None


def names() -> list[str]:
    load()
    return list(_REGISTRY)


def generator_of(pair: dict) -> str:
    """The generator that made a pair (pairs written before generators existed: P2P)."""
    return pair.get("generator") or DEFAULT


def param_columns(generator_names) -> dict[str, Param]:
    """The parameter columns of these generators, in declaration order (one name each)."""
    out: dict[str, Param] = {}
    for name in dict.fromkeys(generator_names):
        for col, p in get(name).columns().items():
            if col in out and out[col].type != p.type:
                raise DsbuildError(f"generators declare {col!r} with two types "
                                   f"({out[col].type}, {p.type}); rename one column")
            out.setdefault(col, p)
    return out


def param_values(pair: dict, columns: dict[str, Param] | None = None) -> dict[str, Any]:
    """A pair's declared parameters by column (columns of other generators: None)."""
    own = get(generator_of(pair))
    cols = columns if columns is not None else own.columns()
    params = pair.get("params") or {}
    mine = own.columns()
    return {c: (mine[c].value(params) if c in mine else None) for c in cols}


def by_role(pair: dict, role: str) -> Any:
    """The raw value of the parameter the pair's generator declares with ``role`` (None where
    it declares none, or the pair has no value)."""
    for p in get(generator_of(pair)).params:
        if p.role == role:
            return (pair.get("params") or {}).get(p.name)
    return None


# generate's own settings names a generator section may not shadow
RESERVED = frozenset({"generator", "model", "params", "settings", "sections"})
