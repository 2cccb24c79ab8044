"""The editor generator the generate stage runs: a source image per (input caption, seed) made
by a text-to-image model, then the triple's instruction applied to it by a diffusers editing
pipeline, variant after variant of the sweep's knobs.

Both models load once per worker (``keep_loaded``). Plans are grouped by source; consecutive
groups fill batches of ``generate.batch_size`` edits; the batch's missing sources are made in
one text-to-image call and encoded once each, and the driver edits every variant of the batch
together (see drivers.py).

Sessions (generators/turns.py): a run's turns are sequential edits, turn 1 of the root image,
each later node of its parent's output; a block of runs makes its roots in one call and edits
each turn of all its runs in one batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from dsbuild.core.generators import Made, Plan
from dsbuild.core.model_ids import SD
from dsbuild.generate.generators import turns
from dsbuild.generate.generators.editor.drivers import Job, driver_for
from dsbuild.generate.generators.editor.settings import EditorSettings
from dsbuild.generate.generators.editor.sweep import plan_triple
from dsbuild.generate.generators.source import SourceImages
from dsbuild.models import keep_loaded, model_key


class InstructionEditor:
    """Pairs made by an editing pipeline on a generated source image."""

    def __init__(self, settings, own: EditorSettings | None, device: str, dtype: str,
                 batched: bool = True):
        from dsbuild.models.editor import TINY_EDITORS, edit_pipeline_class, load_edit_pipeline

        s = self.settings = settings
        own = self.own = own or EditorSettings()
        self.model = s.model
        self.pipeline = edit_pipeline_class(s.model)
        self.knobs = own.knobs(self.pipeline)
        self.pipe = keep_loaded("generate-editor", (*model_key(s.model), dtype, device),
                                lambda: load_edit_pipeline(s.model, dtype, device))
        self.driver = driver_for(self.pipe, self.knobs["family"], batched)
        src_model = own.source_model or ("tiny" if s.model in TINY_EDITORS else SD)
        self.sources = SourceImages(s, src_model, own.source_steps or s.steps,
                                    own.source_guidance, dtype, device,
                                    "generate.editor.source_model")
        self.source = self.sources.spec
        self.runs = self.orphans = 0

    @property
    def source_pipe(self):
        """The source images' text-to-image pipeline (loaded on first use)."""
        return self.sources.pipe

    def use_build(self, build) -> None:
        self.sources.use_build(build)  # a photo triple's source is its photo

    def plan(self, triple: dict) -> list[Plan]:
        return plan_triple(triple, self.settings, self.own, self.pipeline, self.knobs,
                           self.source)

    def source_id(self, group: tuple) -> str:
        return self.sources.id(group)

    def make_sources(self, groups: list[tuple]) -> list[np.ndarray]:
        return self.sources.make(groups)

    def generate(self, plans: list[Plan]) -> Iterator[Made]:
        single, session = turns.split(plans)
        yield from self._singles(single)
        yield from self._sessions(session)

    def _singles(self, plans: list[Plan]) -> Iterator[Made]:
        s = self.settings
        groups: OrderedDict[tuple, list[Plan]] = OrderedDict()
        for p in sorted(plans, key=lambda p: (p.group, p.triple["id"], p.index)):
            groups.setdefault(p.group, []).append(p)
        held: dict[tuple, tuple[np.ndarray, object]] = {}  # group -> (image, encoded)
        for chunk in _chunks(list(groups.items()), s.batch_size):
            keys = list(dict.fromkeys(key for key, _ in chunk))
            missing = [k for k in keys if k not in held]
            if missing:
                for key, image in zip(missing, self.make_sources(missing), strict=True):
                    held[key] = (image, self.driver.encode(image, s.height, s.width))
            todo = [p for _, part in chunk for p in part]
            jobs = [Job(held[p.group][1], p.triple["edit"], p.seed, p.params["guidance"],
                        p.params["image_guidance"]) for p in todo]
            edited = self.driver.edit(jobs, s.steps, s.height, s.width)
            for plan, image in zip(todo, edited, strict=True):
                yield Made(plan, held[plan.group][0], np.asarray(image, dtype=np.float64),
                           self.source_id(plan.group), record=self.sources.record(plan.group))
            last = chunk[-1][0]
            for key in [k for k in held if k != last]:  # groups come in order: done with it
                del held[key]

    def _sessions(self, plans: list[Plan]) -> Iterator[Made]:
        """Session runs block by block: each turn of every run of a block edited in batches of
        ``generate.batch_size``, every node on its parent's output (the root at turn 1)."""
        s = self.settings
        for block in turns.blocks(plans, self.plan, s.batch_size):
            roots = turns.roots(block, self.make_sources, s.batch_size)
            encoded = {key: self.driver.encode(im, s.height, s.width) for key, im in roots.items()}
            # (run, node) -> (image, encoded); (run, None): the run's root
            held = {(r.id, None): (roots[r.root], encoded[r.root]) for r in block}
            parents = {(r.id, p.triple.get("parent_id")) for r in block for p in r.plans}
            for step in turns.by_turn(block):
                for i in range(0, len(step), s.batch_size):
                    part = step[i:i + s.batch_size]
                    jobs = [Job(held[(r.id, p.triple.get("parent_id"))][1], p.triple["edit"],
                                p.seed, p.params["guidance"], p.params["image_guidance"])
                            for r, p in part]
                    edited = self.driver.edit(jobs, s.steps, s.height, s.width)
                    for (run, plan), image in zip(part, edited, strict=True):
                        image = turns.on_grid(image)
                        node = (run.id, plan.triple["id"])
                        held[node] = (image, self.driver.encode(image, s.height, s.width)
                                      if node in parents else None)
                        if plan.id not in run.asked:
                            continue
                        root = roots[run.root]
                        yield Made(plan, held[(run.id, plan.triple.get("parent_id"))][0], image,
                                   run.node_source_id(plan, self.source_id(run.root)),
                                   images={"session_source": root},
                                   record=run.record(plan, self.sources.record(run.root)))
            self.runs += sum(1 for r in block if r.asked & {p.id for p in r.plans})
            self.orphans += sum(r.orphans for r in block)

    def stats(self) -> dict:
        return {"sources_made": self.sources.made, **self.sources.cut_stats(),
                "instructions_encoded": self.driver.encoded,
                "batched": self.driver.batched, **turns.stats(self.runs, self.orphans)}


def _chunks(groups: list[tuple[tuple, list[Plan]]], batch_size: int):
    """Runs of plans filling batches of ``batch_size`` edits; a group larger than a batch is
    split (its source is made once and kept for the next batch)."""
    chunk, rows = [], 0
    for key, plans in groups:
        for i in range(0, len(plans), batch_size):
            part = plans[i:i + batch_size]
            if chunk and rows + len(part) > batch_size:
                yield chunk
                chunk, rows = [], 0
            chunk.append((key, part))
            rows += len(part)
    if chunk:
        yield chunk
