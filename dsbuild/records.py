"""Record IO: atomic files, JSON-lines shards that resume, and a reader that names bad lines.

Every stage writes ``<dir>/rNNNNN.jsonl`` for its rank. While a rank runs, lines are
appended to ``rNNNNN.jsonl.partial`` (flushed line by line), so a killed run resumes where it
stopped; a truncated last line is dropped on resume. ``commit()`` moves the partial file into
place with ``os.replace``: a reader never sees half a shard.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsbuild.errors import RecordError


def shard_name(rank: int) -> str:
    return f"r{rank:05d}.jsonl"


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temp file beside ``path``; on success fsync and ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def dumps_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write all records atomically; returns the count."""
    n = 0
    with atomic_open(path, "w") as fh:
        for rec in records:
            fh.write(dumps_line(rec))
            n += 1
    return n


def read_jsonl(path: str | os.PathLike, *, strict: bool = True,
               where_key: str | None = None) -> Iterator[dict]:
    """Yield records of one JSON-lines file; a bad line raises RecordError naming file:line.

    With ``where_key``, each record also carries ``"file:line"`` under that key (for messages
    about a record's content later on)."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if strict:
                    raise RecordError(str(path), lineno, f"not valid JSON ({exc.msg})") from None
                continue
            if not isinstance(rec, dict):
                if strict:
                    raise RecordError(str(path), lineno, "expected a JSON object")
                continue
            if where_key:
                rec[where_key] = f"{path}:{lineno}"
            yield rec


def read_shards(directory: str | os.PathLike, ranks: Iterable[int] | None = None) -> Iterator[dict]:
    """Yield the records of every committed shard ``rNNNNN.jsonl`` in a folder, in rank order."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    if ranks is None:
        files = sorted(directory.glob("r[0-9][0-9][0-9][0-9][0-9].jsonl"))
    else:
        files = [directory / shard_name(r) for r in sorted(ranks)]
    for f in files:
        if f.exists():
            yield from read_jsonl(f)


class ShardWriter:
    """Append-only writer for one rank's shard that resumes after a crash.

    ``done`` holds the keys (default ``id``) of records already written by an earlier,
    interrupted attempt; callers skip those. ``commit()`` makes the shard visible.
    """

    def __init__(self, path: str | os.PathLike, key: str = "id", fresh: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if fresh and self.partial.exists():
            self.partial.unlink()
        if self.partial.exists():
            self.records = self._recover()
        self.done = {r.get(key) for r in self.records}
        self._fh = open(self.partial, "a", encoding="utf-8")

    def _recover(self) -> list[dict]:
        """Read complete lines of the partial file; drop a truncated tail and rewrite it."""
        good: list[dict] = []
        raw = self.partial.read_bytes()
        lines = raw.split(b"\n")
        # The last element is b"" when the file ends with a newline; otherwise a torn line.
        for chunk in lines[:-1]:
            if not chunk.strip():
                continue
            try:
                rec = json.loads(chunk)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                good.append(rec)
        with atomic_open(self.partial, "w") as fh:
            for rec in good:
                fh.write(dumps_line(rec))
        return good

    def write(self, record: dict) -> None:
        k = record.get(self.key)
        if k in self.done:
            return
        self._fh.write(dumps_line(record))
        self._fh.flush()
        self.records.append(record)
        self.done.add(k)

    def commit(self) -> int:
        """fsync and move the partial file to the final shard name; returns the record count."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.partial, self.path)
        return len(self.records)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
