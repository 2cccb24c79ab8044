"""The P2P generator the generate stage runs: its model, its sweep and how it batches.

Plans that share (input caption, seed, guidance) share one source image, so they are grouped
behind one source row of the UNet batch, whatever their edit or sweep variant; groups fill
batches of ``generate.batch_size`` images.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from dsbuild.core.generators import Made
from dsbuild.core.hashing import content_id
from dsbuild.core.quiet import CUT_STAT, LIMIT_STAT
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

    def plan(self, triple: dict) -> list[PairPlan]:
        return plan_triple(triple, self.settings, self.sampler.pipe.tokenizer)

    def source_id(self, plan: PairPlan) -> str:
        inp, seed, guidance = plan.group_key
        p = plan.params
        return content_id(self.model, inp, seed, guidance, p["steps"], p["scheduler"],
                          p["height"], p["width"])

    def generate(self, plans: list[PairPlan]) -> Iterator[Made]:
        s = self.settings
        for chunk in _chunks(group_plans(plans), s.batch_size):
            groups = [SourceGroup(*key, [p.target() for p in group]) for key, group in chunk]
            results = self.sampler.generate(groups, s.steps, s.height, s.width, s.batch_size)
            for (_, group), res in zip(chunk, results, strict=True):
                sid = self.source_id(group[0])
                for plan, image, mask in zip(group, res.targets, res.masks, strict=True):
                    yield Made(plan, res.source, image, sid, mask)

    def stats(self) -> dict:
        return {"captions_encoded": self.sampler.encoded, CUT_STAT: self.sampler.cut,
                LIMIT_STAT: self.sampler.L}


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
