"""Content hashes: record ids and config signatures."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values always hash equal."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_id(*parts: Any, length: int = 16) -> str:
    """A stable id from the content it names (hex sha256 prefix)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(canonical_json(part).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:length]


def signature(config: Any, length: int = 12) -> str:
    """A short hash of a stage's settings; names the stage's completion-marker folder."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:length]
