"""Stage declarations: the one place a stage is described.

A :class:`Stage` names everything the rest of dsbuild needs to know about a stage: its output
folder, the stages it reads, its settings model, its run function, its CLI command, the extra
that installs its imports and whether it shards. :class:`dsbuild.core.build.Build` (signatures,
markers, ``status``), ``dsbuild run``, the ``dsbuild`` command group and the build config
model all derive from these declarations, and nothing else lists the stages.

Adding a stage is one new package (settings model, ``run`` function) plus one
``register(Stage(...))`` call (its command is derived by the cli layer) — here for built-in stages, or in the plugin's own module,
found through the ``dsbuild.core.stages`` entry-point group (or ``DSBUILD_PLUGINS=module,...``).
See docs/architecture.md, "Add a stage".

This module imports only settings models (pydantic) so that ``dsbuild status`` stays light.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsbuild.core import deps
from dsbuild.core.errors import DsbuildError
from dsbuild.core.settings import StageSettings

# Build inputs a stage may sign besides its own settings and upstream stages: the recipe,
# a non-stage config section ("split", "review"), or the curators' decisions file; also one
# setting of another section as "SECTION.KEY" (sources signs generate.height/width).
SIGNABLE = ("recipe", "split", "review", "decisions")


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared once.

    ``run`` and ``command`` are ``"module:attribute"`` strings, imported only when used, so
    that declaring a stage never imports torch. ``run(build, rank=0, world_size=1, *,
    force=False)`` returns a :class:`dsbuild.core.build.StageResult` and goes through
    ``Build.run_stage``, which skips done ranks, resumes partial ones, writes the completion
    marker last and then the stage's ``report``.
    """

    name: str
    output: str  # record stages: folder of rNNNNN.jsonl; file stages: the file/folder written
    settings: type[StageSettings]
    run: str
    help: str
    upstream: tuple[str, ...] = ()  # must be complete first; their signatures sign this one
    uses: tuple[str, ...] = ()  # read when complete (optional input); signed when complete
    signs: tuple[str, ...] = ()  # other build inputs in the signature (see SIGNABLE)
    # the `dsbuild <stage>` command: None derives it from this declaration (dsbuild.cli.stage:
    # BUILD, the shard, --set, --force, --wait and executor options, plus ``options``); a
    # "module:attr" names a hand-written click command instead (cli layer or a plugin)
    command: str | None = None
    options: tuple[str, ...] = ()  # settings fields the derived command also takes as options
    summary: str | None = None  # "module:function"(build, result) -> lines printed after a rank
    # "module:function"(build) -> dict | None: the stage's report (reports/), written by the
    # runner once every rank is done (``report_each_rank``: after each rank, with those done)
    report: str | None = None
    report_each_rank: bool = False
    command_name: str | None = None  # default: the stage name
    extra: str | None = None  # pip extra the stage needs, checked before its command runs
    sharded: bool = True  # takes --rank/--world-size; False: always rank 0 of 1
    records: bool = True  # writes JSON-lines records (False: files, e.g. export, reports)
    key: str = "id"  # record field the shard writer resumes on
    unit: str = "record"  # what one record is on the stage's progress bars, one worker or many
    # "module:function"(build, world_size) -> list[int] | None: the records each rank will
    # write, known before any rank runs, so the driver's bar over many workers has its whole
    # total from the start (None, or no function: it is estimated, and only ever grows)
    expected: str | None = None
    check: str | None = None  # "module:function"(config) run by `dsbuild init` before writing
    verify: str | None = None  # "module:function"(build, record) -> why it is damaged, or None
    # what `dsbuild run --offline` sets for this stage: its demo-sized, network-free values
    offline: dict[str, Any] = field(default_factory=dict)
    # "module:function"(config) -> bool: whether this build runs the stage at all (None:
    # always). An optional stage that is off (sources without photos) is skipped by `dsbuild
    # run`, and a stage that ``uses`` it signs as if it did not exist, so builds that never
    # configure it keep their signatures; once on, it is required like an upstream stage.
    active: str | None = None
    # "module:function"(build) -> JSON: what the stage reads from outside the build (a photo
    # folder's file names and sizes), signed with its settings so a changed input reruns it
    fingerprint: str | None = None

    def __post_init__(self):
        bad = [s for s in self.signs if s not in SIGNABLE and "." not in s]
        if bad:
            raise ValueError(f"stage {self.name}: cannot sign {bad}; choose from {SIGNABLE}")

    @property
    def cli_name(self) -> str:
        return self.command_name or self.name

    def is_active(self, config) -> bool:
        """Whether a build with ``config`` runs this stage (see ``active``)."""
        return self.active is None or bool(deps.load_target(self.active, f"stage {self.name}")(
            config))

    def load_run(self) -> Callable:
        """The run function; a missing optional dependency fails with the pip line."""
        return deps.load_target(self.run, what=f"stage {self.name}")


_REGISTRY: dict[str, Stage] = {}
_plugins_loaded = False

# The built-in stages, in run order. Each package declares its own stage in its __init__
# (``STAGE = register(Stage(...))``); the core only names them, so it never imports a stage.
BUILTIN = ("dsbuild.sources", "dsbuild.captions", "dsbuild.generate", "dsbuild.filter", "dsbuild.verify",
           "dsbuild.augment", "dsbuild.diversity", "dsbuild.export")
_builtins_loading = False


def load_builtins() -> None:
    """Import the built-in stage packages once (each registers its stage)."""
    global _builtins_loading
    if _builtins_loading:
        return
    _builtins_loading = True
    for name in BUILTIN:
        importlib.import_module(name)


def register(stage: Stage, *, replace: bool = False) -> Stage:
    """Add a stage (built-in, plugin or test). Its upstream stages must exist already."""
    load_builtins()
    if stage.name in _REGISTRY and not replace:
        raise DsbuildError(f"stage {stage.name!r} is already registered")
    if stage.name in RESERVED:
        raise DsbuildError(f"{stage.name!r} is a build config section, not a stage name")
    builtin = f"dsbuild.{stage.name}" in BUILTIN
    for up in (*stage.upstream, *stage.uses):
        # a built-in may be imported before the built-ins it reads: they follow in BUILTIN
        if up not in _REGISTRY and up != stage.name and not (
                builtin and f"dsbuild.{up}" in BUILTIN):
            raise DsbuildError(f"stage {stage.name!r} reads {up!r}, which is not a stage "
                               f"(known: {', '.join(_REGISTRY)})")
    _REGISTRY[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage (tests that register their own)."""
    _REGISTRY.pop(name, None)


def load_plugins() -> None:
    """Import the built-in stages, then plugins once: ``dsbuild.stages`` entry points and
    ``DSBUILD_PLUGINS``."""
    global _plugins_loaded
    load_builtins()
    if _plugins_loaded:
        return
    _plugins_loaded = True
    names = [m.strip() for m in os.environ.get("DSBUILD_PLUGINS", "").split(",") if m.strip()]
    for name in names:
        importlib.import_module(name)
    from importlib.metadata import entry_points

    for ep in entry_points(group="dsbuild.stages"):
        obj = ep.load()
        if isinstance(obj, Stage) and obj.name not in _REGISTRY:
            register(obj)


def all_stages() -> list[Stage]:
    """Every stage, upstream before downstream (built-ins in BUILTIN order, then plugins in
    registration order)."""
    load_plugins()
    order: list[Stage] = []
    seen: set[str] = set()

    def visit(s: Stage, path: tuple[str, ...]):
        if s.name in seen:
            return
        if s.name in path:
            raise DsbuildError(f"stage cycle: {' -> '.join((*path, s.name))}")
        for up in (*s.upstream, *s.uses):
            visit(_REGISTRY[up], (*path, s.name))
        seen.add(s.name)
        order.append(s)

    # built-ins in BUILTIN order (whichever package was imported first), then plugins
    rank = {name.rsplit(".", 1)[1]: i for i, name in enumerate(BUILTIN)}
    for s in sorted(_REGISTRY.values(), key=lambda s: rank.get(s.name, len(rank))):
        visit(s, ())
    return order


def get(name: str) -> Stage:
    load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DsbuildError(f"unknown stage {name!r} (stages: {', '.join(_REGISTRY)})") from None


def find(name: str) -> Stage | None:
    load_plugins()
    return _REGISTRY.get(name)


def offline_settings() -> list[str]:
    """Every stage's own offline values (its declaration's ``offline``) as overrides."""
    return [f"{st.name}.{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for st in all_stages() for key, value in st.offline.items()]


def names() -> list[str]:
    return [s.name for s in all_stages()]


def needed_for(name: str) -> list[str]:
    """``name`` and every stage it needs, in run order."""
    target = get(name)
    want: set[str] = set()

    def visit(s: Stage):
        if s.name in want:
            return
        want.add(s.name)
        for up in (*s.upstream, *s.uses):
            visit(get(up))

    visit(target)
    return [s.name for s in all_stages() if s.name in want]


# Config sections that are not stages (see dsbuild.core.config.BuildConfig).
RESERVED = frozenset({"recipe", "recipe_path", "dsbuild_version", "split", "review"})

