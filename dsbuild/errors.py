"""Errors that tell the user what to fix (file, line, field)."""

from __future__ import annotations


class DsbuildError(Exception):
    """Base error: the CLI prints its message and exits with status 2, no traceback."""

    exit_code = 2


class ConfigError(DsbuildError):
    """A recipe or config file is invalid; names the file, the key path and what was expected."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path = str(path)
        self.problems = problems
        lines = [f"{self.path}: invalid configuration"]
        for key, msg in problems:
            lines.append(f"  {key or '<root>'}: {msg}")
        super().__init__("\n".join(lines))


class RecordError(DsbuildError):
    """A record file has a bad line; names the file and line number."""

    def __init__(self, path: str, line: int, msg: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {msg}")


class MissingDependency(DsbuildError):
    """An optional dependency is missing; the message carries the pip line that fixes it."""


def require(module: str, extra: str, package: str | None = None):
    """Import an optional dependency or fail early with the pip line that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pkg = package or module
        raise MissingDependency(
            f"{pkg} is needed for this step but could not be imported ({exc}).\n"
            f"  Install it with: pip install 'dsbuild[{extra}]'"
        ) from exc
