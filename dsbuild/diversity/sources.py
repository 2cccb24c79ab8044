"""What the diversity report reads: a build's committed captions or a triples .jsonl file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dsbuild.core.errors import DsbuildError
from dsbuild.core.records import read_jsonl
from dsbuild.diversity.settings import DiversitySettings


@dataclass
class Source:
    """One build or triples file, with its triples ordered by id."""

    name: str
    path: Path
    kind: str  # "build" | "triples"
    records: list[dict]
    settings: DiversitySettings
    reports_dir: Path
    notes: list[str] = field(default_factory=list)


def _read_triples_file(path: Path) -> list[dict]:
    """Triples of a .jsonl file, each remembering its file:line for error messages."""
    return list(read_jsonl(path, where_key="_where"))


def load_source(path: str | Path) -> Source:
    """Open a build directory (its committed captions) or a triples .jsonl file."""
    from dsbuild.core.build import Build

    path = Path(path)
    if path.is_dir():
        build = Build.open(path)
        recs = []
        for i, rec in enumerate(build.records("captions"), 1):
            rec = dict(rec)
            rec["_where"] = f"build {path}: triple {rec.get('id', f'#{i}')}"
            recs.append(rec)
        return Source(build.name, path, "build", recs, build.config.diversity,
                      build.reports_dir)
    if path.is_file():
        return Source(path.stem, path, "triples", _read_triples_file(path), DiversitySettings(),
                      path.resolve().parent / "reports")
    raise DsbuildError(f"{path}: no such build directory or triples .jsonl file")


def field_values(src: Source, records: list[dict], name: str) -> list[str]:
    """The string values of one field; a missing or non-string value is a clear error."""
    out = []
    for r in records:
        v = r.get(name)
        if not isinstance(v, str):
            what = "is missing" if v is None else f"is {type(v).__name__}, expected a string"
            raise DsbuildError(f"{r['_where']}: field '{name}' {what}")
        out.append(v)
    return out


def unique_names(sources: list[Source]) -> None:
    """Make source names unique (parent folder, then a counter), for side-by-side tables."""
    seen: Counter[str] = Counter(s.name for s in sources)
    for s in sources:
        if seen[s.name] > 1:
            s.name = f"{s.path.resolve().parent.name}/{s.name}"
    seen = Counter()
    for s in sources:
        seen[s.name] += 1
        if seen[s.name] > 1:
            s.name = f"{s.name} ({seen[s.name]})"
