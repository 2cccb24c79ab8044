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
        self.path, self.line, self.msg = str(path), line, msg
        super().__init__(f"{path}:{line}: {msg}")


class StageFailed(DsbuildError):
    """A stage ran but its output is not good enough to count as done (empty, too short, a dead
    endpoint): nothing is lost and no completion marker is written; exit status 1."""

    exit_code = 1


class MissingDependency(DsbuildError):
    """An optional dependency is missing; the message carries the pip line that fixes it."""


class WriteFailed(DsbuildError):
    """A file could not be written (disk full, quota, read-only): the machine, not the input,
    stopped the work; exit status 1. The message names the file and what to free."""

    exit_code = 1
