"""Real photos a build starts from (the sources stage's records), read by the stages after it.

The sources stage (dsbuild/sources/) writes one :class:`dsbuild.core.schema.Photo` record per
kept photo and the photo prepared at the generation resolution as ``photos/img/<id>.png``.
Captions (grounded triples), generate (inversion, region edits), verify and export read them
through this module, so no stage imports another.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dsbuild.core.errors import DsbuildError

STAGE = "sources"


def has_photos(build) -> bool:
    """Whether this build has a complete sources stage."""
    from dsbuild.core import stages

    return stages.find(STAGE) is not None and build.is_complete(STAGE)


def photos_by_id(build) -> dict[str, dict]:
    """The build's photo records by id (empty when the build has no complete sources stage)."""
    if not has_photos(build):
        return {}
    return {p["id"]: p for p in build.records(STAGE)}


def photo_of(build, triple: dict, photos: dict[str, dict] | None = None) -> dict | None:
    """The photo record a triple was written from (None for a synthetic triple)."""
    pid = triple.get("photo_id")
    if not pid:
        return None
    photos = photos_by_id(build) if photos is None else photos
    photo = photos.get(pid)
    if photo is None:
        raise DsbuildError(f"{build.root}: triple {triple.get('id')} names photo {pid!r}, which "
                           "is not among the sources stage's photos; rerun `dsbuild captions "
                           "--force`")
    return photo


def load_photo(build, photo: dict) -> np.ndarray:
    """The prepared photo as float32 H x W x 3 in [0, 1]."""
    path = build.root / photo["image"]
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise DsbuildError(f"{path}: the prepared photo {photo['id']} cannot be read ({exc}); "
                           "rerun `dsbuild sources --force`") from exc
    return arr
