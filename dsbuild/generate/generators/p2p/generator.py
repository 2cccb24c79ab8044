"""The P2P generator the generate stage runs: its model, its sweep and how it batches.

Plans that share (input caption, seed, guidance) share one source image, so they are grouped
behind one source row of the UNet batch, whatever their edit or sweep variant; groups fill
batches of ``generate.batch_size`` images.

Sessions (dsbuild.core.sessions): a run (one draw k of a session: one seed, one guidance) is
one group, its root the source row and each node a row reading its parent's row, so a K-turn
chain costs K+1 images and a tree one per node plus the root. A session's runs are cut into
fixed blocks of consecutive draws, as many runs as fill ``generate.batch_size`` (a run bigger
than the batch is a block alone, run whole); a block is always made whole, the runs not asked
for re-planned and dropped, so a resumed run is made in the batch it was made in before the
kill and its images are the same to the bit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from dsbuild.core import sessions
from dsbuild.core.errors import DsbuildError
from dsbuild.core.generators import Made
from dsbuild.core.hashing import content_id
from dsbuild.core.quiet import CUT_STAT, LIMIT_STAT
from dsbuild.generate.generators.p2p.invert import Inverter, psnr
from dsbuild.generate.generators.p2p.sampler import P2PGenerator, SourceGroup
from dsbuild.generate.generators.p2p.sweep import PairPlan, plan_triple
from dsbuild.generate.settings import GenerateSettings
from dsbuild.models import keep_loaded, load_sd_pipeline, model_key


class PromptToPrompt:
    """Prompt-to-Prompt pairs on a Stable Diffusion pipeline loaded once per worker."""

    def __init__(self, settings: GenerateSettings, own, device: str, dtype: str):
        s = self.settings = settings
        self.model = s.model
        pipe = keep_loaded("generate", (*model_key(s.model), dtype, device),
                           lambda: load_sd_pipeline(s.model, dtype, device))
        segmenter = None
        if s.blend and s.blend_mask == "segment":
            from dsbuild.models import load_segmenter

            key = (*model_key(s.segmenter), s.segment_threshold, *model_key(s.detector),
                   *model_key(s.sam_model), s.box_threshold, device)
            segmenter = keep_loaded("generate-segmenter", key, lambda: load_segmenter(
                s.segmenter, s.segment_threshold, s.detector, s.sam_model, s.box_threshold,
                device))
        self.sampler = P2PGenerator(pipe, s.scheduler, s.blend_threshold, s.blend_start,
                                    segmenter)
        self.photos: dict[str, dict] = {}
        self.load_photo: Callable[[dict], np.ndarray] | None = None
        self.inverter: Inverter | None = None

    def use_build(self, build) -> None:
        """The build's photos, and its folder of inversions (pairs/inversions)."""
        from dsbuild.core import photos

        self.use_photos(photos.photos_by_id(build), lambda p: photos.load_photo(build, p),
                        build.root / "pairs" / "inversions")

    def use_photos(self, by_id: dict[str, dict], load: Callable[[dict], np.ndarray],
                   folder: Path | None) -> None:
        """Photos by id, how to read one (float H x W x 3), where inversions are kept."""
        self.photos, self.load_photo = by_id, load
        self.inverter = None
        self._folder = folder

    def invert(self) -> Inverter:
        if self.inverter is None:
            self.inverter = Inverter(self.sampler, self.model, self.settings.inversion,
                                     getattr(self, "_folder", None))
        return self.inverter

    def plan(self, triple: dict) -> list[PairPlan]:
        return plan_triple(triple, self.settings, self.sampler.pipe.tokenizer)

    def source_id(self, plan: PairPlan) -> str:
        inp, seed, guidance = plan.group_key
        p = plan.params
        return content_id(self.model, inp, seed, guidance, p["steps"], p["scheduler"],
                          p["height"], p["width"])

    def generate(self, plans: list[PairPlan]) -> Iterator[Made]:
        s = self.settings
        session = [p for p in plans if sessions.is_session(p.triple)]
        if session:
            yield from self._sessions(session)
            plans = [p for p in plans if not sessions.is_session(p.triple)]
        photo = [p for p in plans if p.triple.get("photo_id")]
        if photo:
            yield from self._from_photos(photo)
            plans = [p for p in plans if not p.triple.get("photo_id")]
        for chunk in _chunks(group_plans(plans), s.batch_size):
            groups = [SourceGroup(*key, [p.target() for p in group]) for key, group in chunk]
            results = self.sampler.generate(groups, s.steps, s.height, s.width, s.batch_size)
            for (_, group), res in zip(chunk, results, strict=True):
                sid = self.source_id(group[0])
                for plan, image, mask in zip(group, res.targets, res.masks, strict=True):
                    yield Made(plan, res.source, image, sid, mask)

    def _from_photos(self, plans: list[PairPlan]) -> Iterator[Made]:
        """Pairs of real photos: each group's source branch starts from the photo's inversion
        (DDIM, its per-step unconditional embeddings) and reconstructs it; the pair's input
        image is the prepared photo itself, the reconstruction an extra image."""
        s = self.settings
        for chunk in _chunks(group_plans(plans), s.batch_size):
            groups, extra = [], []
            for (caption, seed, guidance), group in chunk:
                t = group[0].triple
                image, got, rec = self._photo(t["photo_id"], t, caption, guidance)
                groups.append(SourceGroup(caption, seed, guidance,
                                          [p.target() for p in group], got.latents, got.uncond))
                sid = content_id("photo", self.model, rec["id"], caption, s.steps, guidance,
                                 s.inversion)
                extra.append((image, got, rec, sid))
            results = self.sampler.generate(groups, s.steps, s.height, s.width, s.batch_size,
                                            scheduler="ddim")
            for (_, group), res, (image, got, rec, sid) in zip(chunk, results, extra,
                                                               strict=True):
                record = {"photo_id": rec["id"],
                          "reconstruction_psnr": psnr(res.source, got.round_trip)}
                for plan, target, mask in zip(group, res.targets, res.masks, strict=True):
                    yield Made(plan, image, target, sid, mask,
                               images={"reconstruction": res.source}, record=dict(record))

    def _sessions(self, plans: list[PairPlan]) -> Iterator[Made]:
        """Session runs, block by block (see the module doc); only the plans asked for are
        yielded."""
        asked = {p.id for p in plans}
        by_session: dict[str, list[PairPlan]] = {}
        for p in plans:
            by_session.setdefault(p.triple["session_id"], []).append(p)
        for sid in sorted(by_session):
            triples = {p.triple["id"]: p.triple for p in by_session[sid]}
            # every draw of every node the stage handed (a run is handed whole)
            runs: dict[int, list[PairPlan]] = {}
            for t in triples.values():
                for p in self.plan(t):
                    runs.setdefault(p.index, []).append(p)
            per = max(1, self.settings.batch_size // (1 + len(triples)))
            wanted = sorted({p.index for p in by_session[sid]})
            for block in sorted({k // per for k in wanted}):
                draws = [k for k in range(block * per, (block + 1) * per) if k in runs]
                for m in self._session_block([runs[k] for k in draws]):
                    if m.plan.id in asked:
                        yield m

    def _session_block(self, runs: list[list[PairPlan]]) -> Iterator[Made]:
        """One batch of session runs: each run a group (root + nodes, parents first)."""
        s = self.settings
        groups, metas = [], []
        for run in runs:
            nodes = [p for p in sorted(run, key=lambda p: (int(p.triple.get("turn") or 0),
                                                          p.triple["id"]))]
            pos = {p.triple["id"]: i for i, p in enumerate(nodes)}
            targets = []
            for p in nodes:
                parent = p.triple.get("parent_id")
                if parent is not None and parent not in pos:
                    raise DsbuildError(
                        f"generate: session node {p.triple['id']} names parent {parent}, which "
                        f"is not a node of session {p.triple['session_id']} among the triples; "
                        "rerun `dsbuild captions --force`")
                targets.append(replace(p.target(), parent=None if parent is None
                                       else pos[parent]))
            first = nodes[0]
            roots = {p.triple["input"] for p in nodes if p.triple.get("parent_id") is None}
            if len(roots) != 1:
                raise DsbuildError(f"generate: session {first.triple['session_id']} has turn-1 "
                                   f"nodes with {len(roots)} input captions (one root caption "
                                   "expected); rerun `dsbuild captions --force`")
            seed, guidance = first.seed, first.params["guidance"]
            photo_id = next((p.triple["photo_id"] for p in nodes if p.triple.get("photo_id")),
                            None)
            group = SourceGroup(roots.pop(), seed, guidance, targets)
            photo = None
            if photo_id is not None:
                photo = self._photo(photo_id, first.triple, group.prompt, guidance)
                group.latents, group.uncond = photo[1].latents, photo[1].uncond
            groups.append(group)
            metas.append((nodes, photo))
        photo_runs = {i for i, (_, photo) in enumerate(metas) if photo is not None}
        if photo_runs and len(photo_runs) != len(groups):  # one scheduler per batch
            yield from self._session_block([r for i, r in enumerate(runs) if i in photo_runs])
            yield from self._session_block([r for i, r in enumerate(runs)
                                            if i not in photo_runs])
            return
        results = self.sampler.generate(groups, s.steps, s.height, s.width, s.batch_size,
                                        scheduler="ddim" if photo_runs else None)
        for (nodes, photo), group, res in zip(metas, groups, results, strict=True):
            first = nodes[0]
            run = sessions.run_id(first.triple["session_id"], first.seed,
                                  first.params["guidance"], first.index)
            root = res.source if photo is None else photo[0]
            extra: dict = {}
            if photo is not None:
                extra = {"photo_id": photo[2]["id"],
                         "reconstruction_psnr": psnr(res.source, photo[1].round_trip)}
            for plan, t, image, mask in zip(nodes, group.targets, res.targets, res.masks,
                                            strict=True):
                source = root if t.parent is None else res.targets[t.parent]
                parent = plan.triple.get("parent_id")
                images = {"session_source": root}
                if photo is not None and t.parent is None:
                    images["reconstruction"] = res.source
                yield Made(plan, source, image, content_id(run, parent or "root"), mask,
                           images=images,
                           record={**sessions.session_fields(plan.triple),
                                   sessions.RUN_FIELD: run, **extra})

    def _photo(self, photo_id: str, triple: dict, caption: str, guidance: float):
        """A session's root photo: (the prepared image, its inversion, its record)."""
        s = self.settings
        rec = self.photos.get(photo_id)
        if rec is None or self.load_photo is None:
            raise DsbuildError(f"generate: triple {triple['id']} names photo {photo_id!r}, "
                               "which is not among the build's photos; rerun `dsbuild captions "
                               "--force`")
        image = self.load_photo(rec)
        if image.shape[:2] != (s.height, s.width):
            raise DsbuildError(
                f"generate: photo {rec['id']} ({rec.get('image')}) is "
                f"{image.shape[1]}x{image.shape[0]}, not generate.width x height "
                f"{s.width}x{s.height}; rerun `dsbuild sources --force` at that size")
        return image, self.invert().get(rec["id"], image, caption, s.steps, guidance), rec

    def stats(self) -> dict:
        out = {"captions_encoded": self.sampler.encoded, CUT_STAT: self.sampler.cut,
               LIMIT_STAT: self.sampler.L}
        if self.inverter is not None:  # photo builds only: their counters
            out["inversions"] = self.inverter.computed
            out["inversions_reused"] = self.inverter.loaded
        return out


def group_plans(plans: list[PairPlan]) -> list[tuple[tuple, list[PairPlan]]]:
    """Pairs grouped by (input caption, seed, guidance): each group shares one source image."""
    groups: OrderedDict[tuple, list[PairPlan]] = OrderedDict()
    for p in sorted(plans, key=lambda p: (p.group_key, p.triple["id"], p.index)):
        groups.setdefault(p.group_key, []).append(p)
    return list(groups.items())


def _chunks(groups, batch_size: int):
    """Consecutive groups filling about one UNet batch (a big group is split by the sampler)."""
    chunk, rows = [], 0
    for key, plans in groups:
        if chunk and rows + 1 + len(plans) > batch_size:
            yield chunk
            chunk, rows = [], 0
        chunk.append((key, plans))
        rows += 1 + len(plans)
    if chunk:
        yield chunk
