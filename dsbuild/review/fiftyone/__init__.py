"""Curate pairs in FiftyOne: a grouped dataset per build, saved views, tags read back.

One module per concern: :mod:`.db` (the mongod FiftyOne runs on, importing FiftyOne),
:mod:`.dataset` (name, slices, sample fields from the schema, opening it), :mod:`.tiles` (the
``pair`` slice's images), :mod:`.sync` (build -> samples), :mod:`.views` (saved views),
:mod:`.pull` (tags -> decisions), :mod:`.operators` (what the App plugin in ``plugin/`` does),
:mod:`.app` (the App). Nothing here imports fiftyone until a function needs it.
"""

from dsbuild.review.fiftyone.app import launch
from dsbuild.review.fiftyone.dataset import PLUGIN, TOOL, all_slices, dataset_name, sample_fields
from dsbuild.review.fiftyone.db import (
    OLDEST_MONGODB_NOTICE,
    Mongod,
    find_mongod,
    free_port,
    import_fiftyone,
)
from dsbuild.review.fiftyone.operators import (
    build_of,
    give_verdict,
    plugin_dir,
    register_plugin,
    reject_reasons,
    reviewer_name,
)
from dsbuild.review.fiftyone.pull import pull, tag_decisions
from dsbuild.review.fiftyone.sync import build_dataset, collect_rows
from dsbuild.review.fiftyone.tiles import TILE_HEIGHT, render_tile, tile_layout

__all__ = ["OLDEST_MONGODB_NOTICE", "PLUGIN", "TILE_HEIGHT", "TOOL", "Mongod", "all_slices",
           "build_dataset", "build_of", "collect_rows", "dataset_name", "find_mongod",
           "free_port", "give_verdict", "import_fiftyone", "launch", "plugin_dir", "pull",
           "register_plugin", "reject_reasons", "render_tile", "reviewer_name", "sample_fields",
           "tag_decisions", "tile_layout"]
