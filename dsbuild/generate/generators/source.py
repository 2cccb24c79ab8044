"""Source images from input captions, shared by the generators that edit an image (the editor,
the images-edit API): a plain text-to-image generation of the triple's input caption, one per
(caption, seed), on the PNG's 1/255 grid (what the PNG holds is what gets edited).

A seed is one source image, shared by every variant and by every triple of the same caption:
the seed of a caption's k-th source depends on (settings seed, input caption, k) only.

A triple made from a real photo (``photo_id``, :mod:`dsbuild.core.photos`) has the photo as its
source instead: the prepared PNG, pixel-equal, in every group of that photo (its group is
(caption, seed, photo id): :func:`source_group`), so the pair's input image is the photo.
"""

from __future__ import annotations

import random
from typing import Annotated

import numpy as np
from pydantic import Field

from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.quiet import CUT_STAT, LIMIT_STAT, count_cut, token_limit

# the source-image fields of the settings of every generator that edits a source (generate.editor,
# generate.api); each declares its own source_model, whose default differs
SourceSteps = Annotated[int | None, Field(ge=1, description="the source's denoising steps "
                                          "(default: generate.steps)")]
SourceGuidance = Annotated[float, Field(ge=0, description="the source's CFG scale")]


def samples_for(triple: dict, s) -> int:
    """N pairs for a triple: by its level, capped by generate.per_triple."""
    n = s.samples_room if triple.get("level") == "room" else s.samples_object
    return min(n, s.per_triple) if s.per_triple else n


def source_seed(s, caption: str, k: int) -> int:
    """The seed of the k-th source image of an input caption."""
    return random.Random(content_id("source", s.seed, caption, k)).randrange(2**31)


def source_group(triple: dict, seed: int) -> tuple:
    """The source a plan edits: (input caption, seed), or for a photo's triple (input
    caption, seed, photo id), whose source is the photo."""
    pid = triple.get("photo_id")
    return (triple["input"], seed, pid) if pid else (triple["input"], seed)


class SourceImages:
    """A text-to-image model (SD 1.x/2.x or 'tiny', loaded once per worker) making source
    images of (caption, seed) groups. ``setting`` names the model's setting in messages."""

    def __init__(self, settings, model: str, steps: int, guidance: float, dtype: str,
                 device: str, setting: str):
        self.settings, self.setting = settings, setting
        self.spec = {"model": model, "steps": steps, "guidance": guidance}
        self._where = (dtype, device)
        self._pipe = None  # loaded on the first source made: a build of photos never loads it
        self.made = 0
        self.cut, self._captions = 0, set()  # captions the text encoder cut (counted once)
        self.photos: dict[str, dict] = {}
        self.load_photo = None
        self.photos_used = 0

    @property
    def pipe(self):
        """The text-to-image pipeline, loaded once per worker when a source is first made."""
        if self._pipe is None:
            from dsbuild.models import keep_loaded, model_key

            model, (dtype, device) = self.spec["model"], self._where
            self._pipe = keep_loaded("generate-source", (*model_key(model), dtype, device),
                                     lambda: _load(model, dtype, device, self.setting))
        return self._pipe

    def use_build(self, build) -> None:
        """Read the build's photos (the sources stage's), for photo triples' groups."""
        from dsbuild.core import photos

        self.use_photos(photos.photos_by_id(build), lambda p: photos.load_photo(build, p))

    def use_photos(self, by_id: dict[str, dict], load) -> None:
        """Photos by id and how to read one (float H x W x 3 in [0, 1])."""
        self.photos, self.load_photo = by_id, load

    def record(self, group: tuple) -> dict | None:
        """Pair-record fields of a group's source: a photo's ``photo_id``."""
        return {"photo_id": group[2]} if len(group) > 2 else None

    def photo(self, group: tuple) -> np.ndarray:
        """The prepared photo of a photo group, pixel-equal (checked at the generation size)."""
        s, pid = self.settings, group[2]
        rec = self.photos.get(pid)
        if rec is None or self.load_photo is None:
            raise DsbuildError(f"generate: a triple names photo {pid!r}, which is not among the "
                               "build's photos; rerun `dsbuild captions --force`")
        image = np.asarray(self.load_photo(rec), dtype=np.float64)
        if image.shape[:2] != (s.height, s.width):
            raise DsbuildError(
                f"generate: photo {pid} ({rec.get('image')}) is {image.shape[1]}x"
                f"{image.shape[0]}, not generate.width x height {s.width}x{s.height}; rerun "
                "`dsbuild sources --force` at that size")
        self.photos_used += 1
        return np.round(image * 255) / 255

    def cut_stats(self) -> dict:
        """The captions cut at the text encoder's token limit, for the stage's marker."""
        if self._pipe is None:  # no source was generated (photos only): nothing was cut
            return {CUT_STAT: self.cut}
        return {CUT_STAT: self.cut, LIMIT_STAT: token_limit(self._pipe.tokenizer)}

    def id(self, group: tuple) -> str:
        """The content id of the source image of a (caption, seed) group."""
        if len(group) > 2:  # a photo: its content id names it
            return content_id("photo-source", group[2])
        caption, seed = group
        src, s = self.spec, self.settings
        # "editor-source": the tag the editor's sources had before they were shared
        return content_id("editor-source", src["model"], caption, seed, src["steps"],
                          src["guidance"], s.height, s.width)

    def make(self, groups: list[tuple]) -> list[np.ndarray]:
        """Source images of (caption, seed) groups in one text-to-image call, float
        H x W x 3 on the 1/255 grid; a photo group's is its photo."""
        made = [g for g in groups if len(g) <= 2]
        images = dict(zip(made, self._make(made), strict=True)) if made else {}
        return [self.photo(g) if len(g) > 2 else images[g] for g in groups]

    def _make(self, groups: list[tuple]) -> list[np.ndarray]:
        import torch

        s, src = self.settings, self.spec
        gens = [torch.Generator("cpu").manual_seed(int(seed)) for _, seed in groups]
        try:
            with torch.no_grad():
                images = self.pipe(
                    [caption for caption, _ in groups], num_inference_steps=src["steps"],
                    guidance_scale=src["guidance"], height=s.height, width=s.width,
                    generator=gens, output_type="np").images
        except ValueError as exc:  # e.g. a size the source model cannot make
            raise DsbuildError(f"{self.setting} {src['model']!r}: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        self.made += len(groups)
        new = {caption for caption, _ in groups} - self._captions
        self._captions |= new
        self.cut += count_cut(self.pipe.tokenizer, sorted(new))
        return [np.round(np.clip(im, 0, 1) * 255) / 255 for im in images]


def _load(model: str, dtype: str, device: str, setting: str):
    from dsbuild.models import load_sd_pipeline, warn_tiny

    if model == "tiny":
        warn_tiny(f"{setting} 'tiny'", "source images",
                  "set it to a real SD 1.x/2.x checkpoint for data")
    return load_sd_pipeline(model, dtype, device, quiet=True, setting=setting)
