"""Recipe and build configuration: pydantic models plus YAML loading with file/line errors."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsbuild.core import stages
from dsbuild.core.deprecation import notice
from dsbuild.core.errors import ConfigError
from dsbuild.core.settings.review import ReviewSettings
from dsbuild.core.settings.split import SplitSettings

Level = Literal["object", "room"]
Operation = Literal["add", "remove", "change", "replace"]
OPERATIONS: tuple[str, ...] = ("add", "remove", "change", "replace")
LEVEL_ORDER: tuple[str, ...] = ("object", "room")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Example(_Strict):
    """A few-shot triple shown to the LLM (and checked by the validator)."""

    input: str = Field(min_length=1)
    edit: str = Field(min_length=1)
    output: str = Field(min_length=1)
    operation: Operation | None = None


class Vocabulary(_Strict):
    """Words the template backend composes from, and the augmenter picks absent things from.

    ``subjects`` are the agent's main things (object agents: kinds of chair; room agents: the
    room names). ``objects`` are things that stand in a room (room agents) and ``features``
    are parts that can be added or removed (object agents: armrests, drawers).
    """

    subjects: list[str] = Field(min_length=1)
    objects: list[str] = Field(default_factory=list)
    features: list[str] = Field(default_factory=list)
    styles: list[str] = Field(default_factory=list)
    materials: list[str] = Field(default_factory=list)
    colours: list[str] = Field(default_factory=list)
    fixtures: list[str] = Field(default_factory=list)
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    materials_for: dict[str, list[str]] = Field(
        default_factory=dict,
        description="materials that suit one subject/object (unlisted: any; []: none)",
    )


class Agent(_Strict):
    name: str
    level: Level
    context: str = Field(min_length=1, description="what this agent writes about")
    count: int = Field(ge=1, description="target number of triples")
    operations: list[Operation] = Field(default_factory=lambda: list(OPERATIONS), min_length=1)
    examples: list[Example] = Field(min_length=1)
    vocabulary: Vocabulary

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError("must be a lowercase slug (letters, digits, '-' or '_')")
        return v


class Recipe(_Strict):
    name: str
    description: str = ""
    version: int = 1
    system_prompt: str | None = Field(None, description="overrides the built-in agent prompt")
    agents: list[Agent] = Field(min_length=1)
    # build settings the recipe comes with: dsbuild.yaml sections applied when a build is made
    # from it, under --set and under --offline's demo values (a photo recipe names its
    # generators); frozen into the build's own sections, so they sign there, not as the recipe
    settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="build settings by section (generate, sources, ...) "
        "that a build made from this recipe starts with")

    def setting_overrides(self) -> list[str]:
        """The recipe's ``settings`` as ``section.key=value`` overrides (values as JSON)."""
        return [f"{section}.{key}={value if isinstance(value, str) else json.dumps(value)}"
                for section, values in self.settings.items() for key, value in values.items()]

    def signed(self) -> dict:
        """What a stage that signs the recipe signs: everything but ``settings`` (those sign
        in the sections they set), so recipes without settings sign as before."""
        return self.model_dump(mode="json", exclude={"settings"})

    @model_validator(mode="after")
    def _unique_agents(self) -> Recipe:
        seen: set[str] = set()
        for a in self.agents:
            if a.name in seen:
                raise ValueError(f"agent name {a.name!r} is used twice")
            seen.add(a.name)
        return self

    def ordered_agents(self) -> list[Agent]:
        """Agents in the difficulty hierarchy: objects first, then rooms (stable otherwise)."""
        return sorted(self.agents, key=lambda a: LEVEL_ORDER.index(a.level))

    def agent(self, name: str) -> Agent:
        for a in self.agents:
            if a.name == name:
                return a
        raise KeyError(name)


# settings that moved between sections: (old section, key) -> new section
MOVED = {("export", "test_ratio"): "split", ("export", "seed"): "split"}


class BuildConfig(BaseModel):
    """Everything in ``dsbuild.yaml``: the recipe, shared sections, and one section per stage.

    The stage sections are not fields written here: each registered stage
    (:mod:`dsbuild.core.stages`) contributes ``<stage name>: <its settings model>``, validated like a
    field (unknown keys are errors) and read as an attribute (``config.generate.steps``).
    """

    model_config = ConfigDict(extra="allow")

    dsbuild_version: str = "0.1.0"
    recipe_path: str | None = None
    recipe: Recipe
    split: SplitSettings = Field(default_factory=SplitSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)

    @model_validator(mode="before")
    @classmethod
    def _stage_sections(cls, data: Any) -> Any:
        """Validate every stage's section with its settings model; reject unknown sections."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for (old, key), new in MOVED.items():  # dsbuild.yaml written before the move
            section = data.get(old)
            if isinstance(section, dict) and key in section:
                section = dict(section)
                data[old] = section
                target = data.setdefault(new, {})
                if isinstance(target, dict):
                    target = data[new] = dict(target)
                    target.setdefault(key, section.pop(key))
        known = set(cls.model_fields)
        errors = []
        for name in list(data):
            if name in known:
                continue
            stage = stages.find(name)
            if stage is None:
                errors.append({"type": "extra_forbidden", "loc": (name,), "input": data[name]})
                continue
            value = data[name]
            renamed = getattr(stage.settings, "renamed", {})
            if isinstance(value, dict):  # keys renamed since this dsbuild.yaml was written
                for old in sorted(renamed.keys() & value.keys()):
                    notice(f"{name}.{old}", f"{name}.{renamed[old]}")
            if not isinstance(value, stage.settings):
                try:
                    data[name] = stage.settings.model_validate(value or {})
                except ValidationError as exc:
                    errors += [{"type": e["type"], "loc": (name, *e["loc"]),
                                "input": e.get("input"), "ctx": e.get("ctx") or {}}
                               for e in exc.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        for stage in stages.all_stages():
            data.setdefault(stage.name, stage.settings())
        return data

    def stage_settings(self, name: str):
        """The settings model of stage ``name``."""
        return getattr(self, name)


# --------------------------------------------------------------------------- loading


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _node_line(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of the deepest ancestor that exists)."""
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if getattr(k, "value", None) == part:
                    nxt = v
                    line = k.start_mark.line + 1
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
            if node is not None:
                line = node.start_mark.line + 1
        else:
            break
        if node is None:
            break
    return line


def validation_problems(
    exc: ValidationError, root: yaml.Node | None = None, prefix: tuple = ()
) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        line = _node_line(root, loc) if root is not None else None
        where = _loc_str(prefix + loc)
        if line:
            where = f"line {line}: {where}" if where else f"line {line}"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required but missing"
        elif err["type"] == "extra_forbidden":
            msg = "is not a known key (check the spelling)"
        problems.append((where, msg))
    return problems


def load_yaml(path: str | Path) -> tuple[Any, yaml.Node | None]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [("", "file not found")]) from None
    except UnicodeDecodeError as exc:
        raw = path.read_bytes()
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(str(path), [(f"line {line}", f"byte {exc.start} is not UTF-8 text "
                                       "(save the file as UTF-8)")]) from None
    except IsADirectoryError:
        raise ConfigError(str(path), [("", "is a folder, expected a YAML file")]) from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(path), [(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from exc
    return data, node


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe; any problem raises one ConfigError listing them all."""
    data, node = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("", "expected a mapping with 'name' and 'agents'")])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), validation_problems(exc, node)) from None


def load_build_config(path: str | Path) -> BuildConfig:
    data, node = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("", "expected a mapping")])
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), validation_problems(exc, node)) from None


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML (numbers, booleans, lists) or keep the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(config: BuildConfig, overrides: list[str] | tuple[str, ...]) -> BuildConfig:
    """Apply ``stage.key=value`` overrides; returns a new validated config or raises ConfigError."""
    if not overrides:
        return config
    data = config.model_dump(mode="json")
    problems: list[tuple[str, str]] = []
    spelled: dict[str, tuple[str, str]] = {}  # setting -> (the key given, its value)
    for item in overrides:
        if "=" not in item:
            problems.append((item, "expected stage.key=value"))
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in config_sections() or parts[0] == "recipe":
            problems.append((key, "expected <stage>.<setting> with a stage of dsbuild.yaml"))
            continue
        if tuple(parts[:2]) in MOVED:  # e.g. export.test_ratio is split.test_ratio now
            parts[0] = MOVED[(parts[0], parts[1])]
        new = current_key(".".join(parts))
        if new != ".".join(parts):  # e.g. captions.limit is captions.per_agent now
            notice(".".join(parts), new)
            parts = new.split(".")
        before = spelled.setdefault(new, (key.strip(), value))
        if before[0] != key.strip() and before[1] != value:
            problems.append((key, f"{before[0]}={before[1]} says otherwise; give {new} once"))
        spelled[new] = (key.strip(), value)
        target = data
        for i, p in enumerate(parts[:-1]):
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                target = None
                problems.append((key, f"{'.'.join(parts[:i + 1])} is a value, not a section"))
                break
        if target is not None:
            target[parts[-1]] = parse_value(value)
    if problems:
        raise ConfigError("--set", problems)
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("--set", validation_problems(exc)) from None


def current_key(key: str) -> str:
    """A ``section.key`` setting under its name now (``captions.limit`` ->
    ``captions.per_agent``); any other key as it is."""
    section, _, rest = key.partition(".")
    stage = stages.find(section)
    renamed = getattr(stage.settings, "renamed", {}) if stage else {}
    return f"{section}.{renamed[rest]}" if rest in renamed else key


def config_changes(old: BuildConfig, new: BuildConfig) -> list[tuple[str, Any, Any]]:
    """``(section.key, old value, new value)`` of every setting ``new`` changes (the recipe
    aside: a build is tied to its recipe), in dsbuild.yaml order; an absent value is None."""
    def flat(data: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(data, dict) and data:
            for key, value in data.items():
                yield from flat(value, f"{prefix}.{key}")
        else:
            yield prefix, data

    shared = {"recipe", "recipe_path", "dsbuild_version"}
    before, after = ({k: v for name, section in c.model_dump(mode="json", exclude=shared).items()
                      for k, v in flat(section, name)} for c in (old, new))
    gone = object()
    return [(k, before.get(k), after.get(k)) for k in dict.fromkeys([*after, *before])
            if before.get(k, gone) != after.get(k, gone)]


def config_sections() -> list[str]:
    """The sections of dsbuild.yaml: the shared ones and one per registered stage."""
    return [*BuildConfig.model_fields, *stages.names()]


def dump_config(config: BuildConfig) -> str:
    return yaml.safe_dump(
        config.model_dump(mode="json", exclude_none=False), sort_keys=False, allow_unicode=True,
        width=100,
    )


def default_recipe_path() -> Path:
    """The built-in interior-design recipe: the installed wheel's copy, else the checkout's."""
    from dsbuild.core.resources import bundled_file

    return bundled_file("recipes", "interior-design.yaml")
