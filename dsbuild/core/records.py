"""Record IO: atomic files, JSON-lines shards that resume, and a reader that names bad lines.

Every stage writes ``<dir>/rNNNNN.jsonl`` for its rank. While a rank runs, lines are
appended to ``rNNNNN.jsonl.partial`` (flushed line by line), so a killed run resumes where it
stopped; a truncated last line is dropped on resume. ``commit()`` moves the partial file into
place with ``os.replace``: a reader never sees half a shard.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsbuild.core.errors import RecordError, WriteFailed
from dsbuild.core.pause import pause_point


def shard_name(rank: int) -> str:
    return f"r{rank:05d}.jsonl"


class DiskFull(WriteFailed):
    """The disk (or quota) filled while writing; what was written so far is kept (exit 1:
    the environment failed, not the input)."""


def disk_error(exc: OSError, path: str | os.PathLike) -> Exception:
    """A one-line DiskFull naming the path for ENOSPC/EDQUOT; other OS errors unchanged."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on the device while writing {path}; what was written "
                        "so far is kept: free some space and run the same command again")
    return exc


def count_lines(path: str | os.PathLike) -> int:
    """Newlines in a file, read in 1 MiB chunks (0 when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def shard_problem(path: str | os.PathLike, expected: int | None, *, parse: bool = True
                  ) -> str | None:
    """Why a committed shard cannot be trusted (a torn or bad line, or a record count other
    than its completion marker's), or None. ``parse=False`` (``dsbuild status``) only checks
    the last byte and counts lines, without decoding a record; a shard writer never writes
    blank lines, so the count is the record count."""
    path = Path(path)
    if not path.exists():
        return "the file is missing"
    if not parse:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    return "its last line is torn (the file ends in the middle of a record)"
        n = count_lines(path)
        if expected is not None and n != expected:
            return f"it holds {n} records but its completion marker says {expected}"
        return None
    n = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if not line.endswith(b"\n"):
                return f"line {lineno} is torn (the file ends in the middle of a record)"
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return f"line {lineno} is not valid JSON"
            if not isinstance(rec, dict):
                return f"line {lineno} is not a JSON object"
            n += 1
    if expected is not None and n != expected:
        return f"it holds {n} records but its completion marker says {expected}"
    return None


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0644 under the usual umask 022); mkstemp's
    0600 would make atomically written files differ from every other file of a build."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temp file beside ``path``; on success fsync and ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_error(exc, path) from None
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_image(path: str | os.PathLike, image, format: str = "PNG") -> None:
    """Save a PIL image atomically (PNG unless ``format`` says otherwise). A PNG keeps the
    image's ``dsbuild:*`` text (a grid's text layer, ``dsbuild.core.grid``) as iTXt chunks."""
    extra = {}
    if format.upper() == "PNG":
        text = {k: v for k, v in getattr(image, "info", {}).items()
                if isinstance(k, str) and k.startswith("dsbuild:") and isinstance(v, str)}
        if text:
            from PIL.PngImagePlugin import PngInfo

            extra["pnginfo"] = PngInfo()
            for k, v in text.items():
                extra["pnginfo"].add_itxt(k, v)
    with atomic_open(path, "wb") as fh:
        image.save(fh, format=format, **extra)


def write_figure(path: str | os.PathLike, fig, dpi: int = 100) -> None:
    """Save a matplotlib figure as a PNG atomically, then close it (pyplot keeps every open
    figure alive until closed)."""
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)


def image_problem(path: str | os.PathLike) -> str | None:
    """Why an image file cannot be used (missing, empty, truncated, not an image), or None.
    Decodes it fully: a PNG cut short still opens, and only fails when its pixels load."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        return f"{path} is missing"
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, UnidentifiedImageError, ValueError) as exc:
        return f"{path} cannot be decoded ({exc})"
    return None


def pair_images_problem(build, pair: dict) -> str | None:
    """The generate stage's record check: every image a pair names decodes."""
    for rel in (pair.get("images") or {}).values():
        why = image_problem(build.root / rel)
        if why:
            return why
    return None


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
        """Read the complete lines of the partial file. A torn last line (a kill mid-write) is
        cut off in place, so the resume appends to the file instead of rewriting it; only a
        bad line in the middle (the file was edited) makes it rewrite the good lines."""
        good: list[dict] = []
        raw = self.partial.read_bytes()
        end = raw.rfind(b"\n") + 1  # bytes up to the last complete line
        bad = 0
        for chunk in raw[:end].split(b"\n"):
            if not chunk.strip():
                continue
            try:
                rec = json.loads(chunk)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                good.append(rec)
            else:
                bad += 1
        if bad:
            with atomic_open(self.partial, "w") as fh:
                for rec in good:
                    fh.write(dumps_line(rec))
        elif end < len(raw):
            os.truncate(self.partial, end)
        return good

    def write(self, record: dict) -> None:
        k = record.get(self.key)
        if k in self.done:
            return
        try:
            self._fh.write(dumps_line(record))
            self._fh.flush()
        except OSError as exc:
            raise disk_error(exc, self.partial) from None
        self.records.append(record)
        self.done.add(k)
        pause_point(self.path, len(self.records))  # a test hook (DSBUILD_PAUSE_AT)

    def commit(self) -> int:
        """fsync and move the partial file to the final shard name; returns the record count."""
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise disk_error(exc, self.partial) from None
        self._fh.close()
        os.replace(self.partial, self.path)
        return len(self.records)

    def close(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError:  # the disk filled: what was flushed is kept, the rest was not
                pass         # counted as written (write() raised), so nothing is lost

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
