"""Files dsbuild ships besides its code: the built-in recipes and the Label Studio configs.

They live at the repository's top level (``recipes/``, ``label_config/``), where users read
them; ``setup.py`` copies both into the wheel as ``dsbuild/data/<folder>/``. A lookup takes the
installed package's copy (importlib.resources) and falls back to the source checkout it runs
from, so an editable install and a plain checkout need no build step.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from dsbuild.core.errors import DsbuildError

DATA_FOLDERS = ("recipes", "label_config")


def checkout_root() -> Path:
    """The folder above the ``dsbuild`` package: the repository root in a source checkout."""
    return Path(__file__).resolve().parents[2]


def bundled_dir(folder: str) -> Path:
    """``recipes`` or ``label_config``: the wheel's copy, else the checkout's folder."""
    if folder not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {folder!r} (one of {DATA_FOLDERS})")
    packaged = files("dsbuild").joinpath("data", folder)
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return checkout_root() / folder


def bundled_file(folder: str, name: str) -> Path:
    """A file dsbuild ships (e.g. ``recipes/interior-design.yaml``); a clear error if absent."""
    path = bundled_dir(folder) / name
    if not path.is_file():
        raise DsbuildError(
            f"dsbuild's {folder}/{name} is missing from this installation (looked in {path}); "
            "reinstall dsbuild from a wheel or run it from a source checkout"
        )
    return path
