"""A test hook: a shard writer stops at a known record so a test can kill it there, with no
race against a running process (tests/test_executors.py, test_generate.py, test_stages.py).

``DSBUILD_PAUSE_AT=SHARD:N:FILE`` (SHARD the end of a shard's path, e.g. ``pairs/r00001.jsonl``):
the first writer of that shard, in any process, to hold N records in its partial file creates
FILE (JSON: pid, shard, records) and then waits until it is killed. A resumed writer already
holds N records, so it never stops again, and no writer stops once FILE exists.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

PAUSE_ENV = "DSBUILD_PAUSE_AT"


def pause_point(shard: Path, records: int) -> None:
    """Wait here forever if ``DSBUILD_PAUSE_AT`` names ``shard`` at ``records`` records."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, n, file = spec.split(":", 2)
    if records != int(n) or not shard.as_posix().endswith(name):
        return
    tmp = Path(f"{file}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "shard": str(shard), "records": records}))
    try:
        os.link(tmp, file)  # FILE appears whole, and only for the first writer
    except FileExistsError:
        return
    finally:
        tmp.unlink()
    threading.Event().wait()
