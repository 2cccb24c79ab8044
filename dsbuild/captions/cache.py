"""A request cache inside the build: a re-run or a resumed run never pays for a call twice.

Entries live under ``build/cache/captions/<key[:2]>/<key>.json``; the key hashes the request
payload (model, messages, temperature, max_tokens) and the sample index, so changing the
prompt or a sampling setting asks again while an interrupted run replays what it got.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsbuild.hashing import content_id
from dsbuild.records import write_json


class RequestCache:
    """Completed LLM responses keyed by (payload, sample); written atomically, one file each."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(payload: dict, sample: int) -> str:
        return content_id("chat.completions", payload, sample, length=32)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put(self, key: str, value: dict) -> None:
        write_json(self.path(key), value)
