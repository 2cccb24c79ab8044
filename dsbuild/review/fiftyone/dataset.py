"""The build's FiftyOne dataset: its name, slices, sample fields, sidebar, and opening it.

Sample fields are the joined row's (:mod:`dsbuild.core.schema`), under the same names as
export columns and Label Studio task data, typed from the schema and the generators' declared
parameters; ``kind`` (pair or no_change) and ``in_build`` are FiftyOne's own, and so is
``session_tree`` (the path of a session's design-tree page), declared only on datasets of builds
with multi-turn sessions: a build of single edits gets exactly the fields it always had.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from dsbuild.core import join
from dsbuild.core.errors import DsbuildError
from dsbuild.core.generators import Param
from dsbuild.core.schema import decided, fields
from dsbuild.review.fiftyone.db import require_database

TOOL = "fiftyone"
SLICES = ("pair", "input", "output", "mask", "session")  # session: a session pair's chain
DEFAULT_SLICE = "pair"  # the tile: a grid of pairs, one sample per pair
PLUGIN = "@dsbuild/review"  # plugin/fiftyone.yml's name; operators are PLUGIN/<name>
INFO_KEY = "dsbuild"


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


# schema field type -> (FiftyOne field class name, converter)
FIELD_CLASS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "string": ("StringField", _str), "json": ("StringField", _str),
    "int": ("IntField", _int), "float": ("FloatField", _float), "bool": ("BooleanField", _bool),
}
OWN_FIELDS = {"kind": "string", "in_build": "bool"}  # FiftyOne's own, not the joined row's
SESSION_OWN_FIELDS = {"session_tree": "string"}  # only where the build has sessions
SESSION_SIDEBAR = ("session_id", "session_run", "turn", "node_id", "parent_id", "session_tree")


def sample_fields(columns: dict[str, Param] | None = None, sessions: bool = False
                  ) -> dict[str, tuple[str, Callable[[Any], Any]]]:
    """Every sample field (images are slices, not fields) -> (FiftyOne class, converter);
    ``sessions``: also the session fields of FiftyOne's own (a build with sessions).

    Every field is declared up front so a first value of 7 (int) never turns ``guidance``
    into an IntField that then rejects 7.5.
    """
    types = {name: f.type for name, f in fields(columns).items() if f.type != "image"}
    own = {**OWN_FIELDS, **(SESSION_OWN_FIELDS if sessions else {})}
    return {name: FIELD_CLASS[t] for name, t in {**types, **own}.items()}


def sidebar(columns: dict[str, Param] | None = None, sessions: bool = False
            ) -> dict[str, tuple[str, ...]]:
    """The App's sidebar: our fields in groups of their own, review first, the review queue's
    ``headed`` and ``review_priority`` in ``queue`` (and a ``session`` group where the build
    has sessions)."""
    return {
        "review": ("review", "review_reason", "corrected_edit", "review_agreement",
                   "review_reviewers", "review_count", "review_tool", "review_reviewer",
                   "review_at"),
        "filter": ("filter_keep", "filter_reason", "filter_rank", "clip_sim_dir",
                   "clip_sim_image", "clip_sim_0", "clip_sim_1", "dino", "scored"),
        "verify": ("verify", "verify_reason", "verify_checks", "judge_score", "judge_pass",
                   "judge_threshold", "judge_scores", "judge_missing", "judge_model",
                   "recaption_unchanged"),
        "queue": ("headed", "review_priority"),
        "pair": ("edit_prompt", "original_edit", "edit_prompt_generated",
                 "edit_prompt_recaptioned", "edit_note", "corrected", "original_prompt",
                 "edited_prompt", "agent", "level", "operation", "no_change", "kind", "recipe",
                 "pair_id", "triple_id", "source_pair_id", "target", "caption_backend",
                 "caption_model", "in_build"),
        "generation": ("seed", "model", "generator", *(columns or {}), "params"),
        "provenance": ("photo_id", "license", "source", "attribution", "reconstruction_psnr"),
        **({"session": SESSION_SIDEBAR} if sessions else {}),
    }


# what a decision changes on a sample (refreshed after every pull and verdict): the review
# fields, the instruction, and the review queue's
DECISION_FIELDS = (*decided("", None), "headed", "review_priority")


def dataset_name(build, name: str | None = None) -> str:
    return name or build.config.review.dataset_name or f"dsbuild-{build.name}"


def open_dataset(fo, build, name: str, create: bool):
    """The build's grouped dataset ``name`` (made when ``create``); refuses another build's."""
    require_database()  # an unreachable FIFTYONE_DATABASE_URI: one line, not a minute's wait
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


def declare_fields(fo, ds, columns: dict[str, Param], sessions: bool = False) -> None:
    schema = ds.get_field_schema()
    for name, (cls, _) in sample_fields(columns, sessions).items():
        if name not in schema:
            ds.add_sample_field(name, getattr(fo, cls))


def set_sidebar(fo, ds, columns: dict[str, Param], sessions: bool = False) -> None:
    """Group our fields in the App's sidebar (review, filter, verify, pair, generation,
    provenance, and session where the build has sessions)."""
    groups_of = sidebar(columns, sessions)
    ours = {f for group in groups_of.values() for f in group}
    groups = fo.DatasetAppConfig.default_sidebar_groups(ds)
    for g in groups:
        g.paths = [p for p in g.paths if p not in ours]
    at = next((i + 1 for i, g in enumerate(groups) if g.name == "tags"), 0)
    mine = [fo.SidebarGroupDocument(name=n, paths=list(f)) for n, f in groups_of.items()]
    ds.app_config.sidebar_groups = groups[:at] + mine + groups[at:]
    ds.save()


def all_slices(ds):
    """Every sample of the grouped dataset, whatever its slice."""
    return ds.select_group_slices(_allow_mixed=True)


def refresh_decisions(ds, build) -> int:
    """Rewrite what decisions set on every sample from decisions.jsonl and the build's joined
    rows: the review fields, the instruction (a correction, else the re-caption under
    ``export.edit_prompt=recaptioned``, else the generated one), ``headed`` and
    ``review_priority`` (a new reject leaves the review queue); a pair whose instruction
    changed gets its tile drawn again. Samples of pairs no longer in the build get what
    :func:`decided` makes of their decision. Returns how many values changed."""
    from dsbuild.review.fiftyone.tiles import ensure_tiles

    reviews = join.Reviews.read(build)
    joined, _ = join.rows(build, policy="all", reviews=reviews)
    want_of: dict[tuple[str, str], dict] = {("pair", r["pair_id"]): r for r in joined}
    for r in join.no_change_rows(build, {r["pair_id"]: r for r in joined}, require=False,
                                 reviews=reviews):
        if r["pair_id"]:
            want_of[("no_change", r["pair_id"])] = r
    view = all_slices(ds)
    schema = ds.get_field_schema()  # a dataset made before the queue fields: inspect adds them
    present = [f for f in DECISION_FIELDS if f in schema]
    ids, pids, kinds, edits, slices, paths, *vals = view.values(
        ["id", "pair_id", "kind", "original_edit", "group.name", "filepath", *present])
    conv = {f: FIELD_CLASS[fields()[f].type][1] for f in present}
    changes: dict[str, dict] = defaultdict(dict)
    images: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    retile: dict[tuple[str, str], str] = {}
    for i, sid in enumerate(ids):
        pid = pids[i]
        images[(kinds[i], pid)][slices[i]] = paths[i]
        want = want_of.get((kinds[i], pid)) or decided(
            edits[i] or "", reviews.in_force.get(pid), reviews.counts.get(pid, 0),
            applies=kinds[i] != "no_change")
        for j, f in enumerate(present):
            v = conv[f](want.get(f))
            if vals[j][i] != v:
                changes[f][sid] = v
                if f == "edit_prompt":
                    retile[(kinds[i], pid)] = v
    tiles = []
    for key, edit in retile.items():
        slots = images[key]
        if "input" in slots and "output" in slots and "pair" in slots:
            tiles.append({"pair_id": key[1], "images": dict(slots),
                          "fields": {"edit_prompt": edit}, "_key": key})
    if tiles:
        ensure_tiles(build, tiles)
        pair_sid = {(kinds[i], pids[i]): sid for i, sid in enumerate(ids) if slices[i] == "pair"}
        for t in tiles:
            changes["filepath"][pair_sid[t["_key"]]] = t["images"]["pair"]
    for f, values in changes.items():
        view.set_values(f, values, key_field="id")
    return sum(len(v) for k, v in changes.items() if k != "filepath")
