"""Build hook: ship the top-level ``recipes/`` and ``label_config/`` as ``dsbuild/data/``.

Users read both folders at the repository's top level, so they stay there; a wheel has no
top level, so ``build_py`` copies them into the package, where ``dsbuild.core.resources`` finds
them with importlib.resources. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_FOLDERS = ("recipes", "label_config")  # dsbuild.core.resources.DATA_FOLDERS


class BuildPyWithData(build_py):
    """``build_py`` plus a copy of each data folder into ``<build_lib>/dsbuild/data/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the folders where they are
        for name in DATA_FOLDERS:
            src = ROOT / name
            if not any(src.glob("*")):
                raise SystemExit(f"setup.py: {src} is missing or empty; the wheel needs it")
            shutil.copytree(src, self._data_dir(name), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [str(self._data_dir(name) / f.relative_to(ROOT / name))
                          for name in DATA_FOLDERS for f in sorted((ROOT / name).rglob("*"))
                          if f.is_file()]

    def _data_dir(self, name: str) -> Path:
        return Path(self.build_lib) / "dsbuild" / "data" / name


setup(cmdclass={"build_py": BuildPyWithData})
