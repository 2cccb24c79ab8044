"""The inpaint generator the generate stage runs: the source image (the triple's photo, or a
text-to-image generation of its input caption: generators/source.py), the edit's region
segmented on it and grown by ``dilate`` pixels, then that region repainted under the triple's
output caption by an inpainting pipeline, variant after variant of the sweep's knobs.

The models load once per worker (``keep_loaded``). A source's mask is computed once and shared
by its variants; each variant is one pipeline call with its own CPU generator (seeded by the
plan), so a pair equals calling the pipeline directly with the same image, mask, seed and
knobs. With ``composite`` the source's pixels are pasted back outside the mask.

Sessions (generators/turns.py): a run's turns are sequential repaints, turn 1 of the root
image, each later node of its parent's output; each turn's mask is the region of its own edit
segmented on the image it edits. Every node of a session is made, whatever its operation (a
turn left out would leave the turns under it without an input image).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from dsbuild.core.generators import Made, Plan
from dsbuild.core.hashing import content_id
from dsbuild.core.model_ids import SD
from dsbuild.core.referring import referred_by_rules
from dsbuild.generate.generators import turns
from dsbuild.generate.generators.inpaint.settings import InpaintSettings
from dsbuild.generate.generators.source import (
    SourceImages,
    samples_for,
    source_group,
    source_seed,
)
from dsbuild.models import keep_loaded, model_key

SECTION = "generate.inpaint"


def plan_triple(triple: dict, s, own: InpaintSettings, pipeline: str, knobs: dict,
                source: dict) -> list[Plan]:
    """Every pair of one triple (none for an operation not in ``own.operations``, except in a
    session); a seed is one source image, shared by ``variants`` knob draws (random) or every
    grid combination. A session node draws from its session (:func:`turns.draw_key`)."""
    key = turns.draw_key(triple)
    if key is triple and triple.get("operation") not in own.operations:
        return []
    n = samples_for(triple, s)
    if own.sweep == "grid":
        combos = list(itertools.product(knobs["grid_guidance"], knobs["grid_strength"]))
    draws: list[tuple[int, float, float]] = []
    for k in itertools.count():
        if len(draws) >= n:
            break
        seed = source_seed(s, key["input"], k)
        per = len(combos) if own.sweep == "grid" else own.variants
        for v in range(min(per, n - len(draws))):
            if own.sweep == "grid":
                g, st = combos[v]
            else:
                rng = random.Random(content_id("inpaint", s.seed, key["id"], k, v))
                g = rng.uniform(*knobs["guidance"])
                st = rng.uniform(*knobs["strength"])
            draws.append((seed, round(float(g), 3), round(float(st), 3)))
    plans, group = [], turns.session_group if key is not triple else source_group
    for i, (seed, g, st) in enumerate(draws):
        params = {"pipeline": pipeline, "steps": s.steps, "guidance": g, "strength": st,
                  "dilate": own.dilate, "composite": own.composite,
                  "default_region": list(own.default_region),
                  "segmenter": own.segmenter, "source_model": source["model"],
                  "source_steps": source["steps"], "source_guidance": source["guidance"],
                  "height": s.height, "width": s.width}
        plans.append(Plan(triple, i, content_id(triple["id"], seed, params), seed, params,
                          group=group(triple, seed)))
    return plans


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` in every direction (a square structuring element)."""
    if pixels <= 0 or not mask.any():
        return mask.copy()
    from PIL import Image, ImageFilter

    im = Image.fromarray(mask.astype("uint8") * 255).filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(im) > 127


def default_mask(height: int, width: int, region) -> np.ndarray:
    """The default region: a box in fractions of the image."""
    x0, y0, x1, y1 = region
    mask = np.zeros((height, width), dtype=bool)
    mask[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = True
    return mask


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray((np.asarray(image) * 255).round().clip(0, 255).astype("uint8"))


def mask_pil(mask: np.ndarray):
    from PIL import Image

    return Image.fromarray(mask.astype("uint8") * 255)


def inpaint(pipe, image: np.ndarray, mask: np.ndarray, prompt: str, seed: int, steps: int,
            guidance: float, strength: float, height: int, width: int) -> np.ndarray:
    """One pipeline call (the call a user makes): float H x W x 3 in [0, 1]."""
    import torch

    gen = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad():
        out = pipe(prompt=[prompt], image=to_pil(image), mask_image=mask_pil(mask),
                   height=height, width=width, strength=strength, guidance_scale=guidance,
                   num_inference_steps=steps, generator=[gen], output_type="np").images
    return np.asarray(out[0], dtype=np.float64)


class RegionInpainter:
    """Pairs made by repainting the edit's segmented region of a source image or photo."""

    def __init__(self, settings, own: InpaintSettings | None, device: str, dtype: str):
        from dsbuild.models.inpaint import (
            TINY_INPAINTERS,
            inpaint_pipeline_class,
            load_inpaint_pipeline,
        )

        s = self.settings = settings
        own = self.own = own or InpaintSettings()
        tiny = s.model in TINY_INPAINTERS
        if own.segmenter is None:
            own = self.own = own.model_copy(update={"segmenter": "tiny" if tiny else None})
        self.model = s.model
        self.pipeline = inpaint_pipeline_class(s.model)
        self.knobs = own.knobs(self.pipeline)
        self.pipe = keep_loaded("generate-inpaint", (*model_key(s.model), dtype, device),
                                lambda: load_inpaint_pipeline(s.model, dtype, device))
        self.sources = SourceImages(s, own.source_model or ("tiny" if tiny else SD),
                                    own.source_steps or s.steps, own.source_guidance, dtype,
                                    device, f"{SECTION}.source_model")
        self.device = device
        self._segmenter = None
        self.masks = {"segment": 0, "default": 0}
        self.runs = self.orphans = 0

    @property
    def segmenter(self):
        """The segmenter, loaded on first use (once per worker)."""
        if self._segmenter is None:
            from dsbuild.core.settings.localize import DEFAULT_SEGMENTER
            from dsbuild.models import load_segmenter

            o = self.own
            name = o.segmenter or DEFAULT_SEGMENTER
            key = (*model_key(name), o.threshold, *model_key(o.detector),
                   *model_key(o.sam_model), o.box_threshold, self.device)
            self._segmenter = keep_loaded("generate-segmenter", key, lambda: load_segmenter(
                name, o.threshold, o.detector, o.sam_model, o.box_threshold, self.device))
        return self._segmenter

    def use_build(self, build) -> None:
        self.sources.use_build(build)  # a photo triple's source is its photo

    def plan(self, triple: dict) -> list[Plan]:
        return plan_triple(triple, self.settings, self.own, self.pipeline, self.knobs,
                           self.sources.spec)

    def region(self, image: np.ndarray, edit: str) -> tuple[np.ndarray, str]:
        """The edit's mask on ``image`` (grown by ``dilate``) and where it came from."""
        s, o = self.settings, self.own
        phrases = referred_by_rules(edit)
        found = self.segmenter.mask(to_pil(image), phrases) if phrases else None
        if found is None or not found.any():
            self.masks["default"] += 1
            return default_mask(s.height, s.width, o.default_region), "default"
        self.masks["segment"] += 1
        return dilate_mask(found, o.dilate), "segment"

    def generate(self, plans: list[Plan]) -> Iterator[Made]:
        single, session = turns.split(plans)
        yield from self._singles(single)
        yield from self._sessions(session)

    def _repaint(self, plan: Plan, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One plan's pipeline call on ``image`` in ``mask`` (composited where set)."""
        s, pr = self.settings, plan.params
        out = inpaint(self.pipe, image, mask, plan.triple["output"], plan.seed, pr["steps"],
                      pr["guidance"], pr["strength"], s.height, s.width)
        return np.where(mask[..., None], out, image) if pr["composite"] else out

    def _singles(self, plans: list[Plan]) -> Iterator[Made]:
        groups: OrderedDict[tuple, list[Plan]] = OrderedDict()
        for p in sorted(plans, key=lambda p: (p.group, p.triple["id"], p.index)):
            groups.setdefault(p.group, []).append(p)
        for group, part in groups.items():
            (image,) = self.sources.make([group])
            sid = self.sources.id(group)
            record = self.sources.record(group)
            masks: dict[str, tuple[np.ndarray, str]] = {}
            for plan in part:
                edit = plan.triple["edit"]
                if edit not in masks:
                    masks[edit] = self.region(image, edit)
                mask, origin = masks[edit]
                out = self._repaint(plan, image, mask)
                done = dataclasses.replace(plan, params={**plan.params, "mask_from": origin})
                yield Made(done, image, out, sid, mask, record=record)

    def _sessions(self, plans: list[Plan]) -> Iterator[Made]:
        """Session runs turn by turn, each node repainting its own edit's region of its
        parent's output (the root at turn 1); a block's roots are made in one call."""
        s = self.settings
        for block in turns.blocks(plans, self.plan, s.batch_size):
            roots = turns.roots(block, self.sources.make, s.batch_size)
            held = {(r.id, None): roots[r.root] for r in block}
            masks: dict[tuple, tuple[np.ndarray, str]] = {}  # turn 1: one per (root, edit)
            for step in turns.by_turn(block, only_asked=True):
                for run, plan in step:
                    parent = plan.triple.get("parent_id")
                    image, edit = held[(run.id, parent)], plan.triple["edit"]
                    where = (run.root, edit) if parent is None else (run.id, parent, edit)
                    if where not in masks:
                        masks[where] = self.region(image, edit)
                    mask, origin = masks[where]
                    out = turns.on_grid(self._repaint(plan, image, mask))
                    held[(run.id, plan.triple["id"])] = out
                    if plan.id not in run.asked:
                        continue
                    done = dataclasses.replace(plan, params={**plan.params, "mask_from": origin})
                    yield Made(done, image, out,
                               run.node_source_id(plan, self.sources.id(run.root)), mask,
                               images={"session_source": roots[run.root]},
                               record=run.record(plan, self.sources.record(run.root)))
            self.runs += sum(1 for r in block if r.asked & {p.id for p in r.plans})
            self.orphans += sum(r.orphans for r in block)

    def stats(self) -> dict:
        return {"sources_made": self.sources.made, "photos_used": self.sources.photos_used,
                **self.sources.cut_stats(), "masks_segmented": self.masks["segment"],
                "masks_default": self.masks["default"],
                **turns.stats(self.runs, self.orphans)}
