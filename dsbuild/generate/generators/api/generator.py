"""The API generator the generate stage runs: source images made by a text-to-image model (one
per input caption and seed, shared by its variants), each sent with the triple's instruction
to an OpenAI-compatible ``/v1/images/edits`` endpoint, ``concurrency`` requests at a time.

Plans are grouped by source; consecutive groups fill chunks of at least ``generate.batch_size``
and ``generate.api.concurrency`` edits; a chunk's sources are made in text-to-image batches of
``generate.batch_size``, then all its edits are asked at once (``generate.api.n`` variants of
one source and instruction per request) and yielded in order. Each returned image is decoded
and checked (size, mode) alone before it is handed on: a bad one is counted in the
stats and skipped (its reply stays cached, so a re-run does not pay for it again). Requests
that failed after every retry are skipped too, and the stage then stops without its marker,
so running it again asks only for those.

Sessions (generators/turns.py): each turn is an images.edit request on its parent's output
(turn 1: on the root image), the turns of a block's runs asked together, turn after turn; a
failed or bad turn drops the turns under it (counted: ``session_turns_dropped``). The cache
answers a resumed run's turns, so it pays for none twice and gets the same pixels.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dsbuild.core.errors import StageFailed
from dsbuild.core.generators import Made, Plan
from dsbuild.generate.generators import turns
from dsbuild.generate.generators.api.settings import ApiSettings
from dsbuild.generate.generators.api.sweep import plan_triple, request_params
from dsbuild.generate.generators.source import SourceImages

SECTION = "generate.api"


class ImagesEditAPI:
    """Pairs made by an images-edit endpoint on a generated source image."""

    def __init__(self, settings, own: ApiSettings | None, device: str, dtype: str):
        from dsbuild.llm.client import check_endpoint

        s = self.settings = settings
        own = self.own = own or ApiSettings()
        check_endpoint(own, SECTION)  # the SDK and the key, before any model loads
        self.model = own.model
        self.sources = SourceImages(s, own.source_model or s.model, own.source_steps or s.steps,
                                    own.source_guidance, dtype, device,
                                    f"{SECTION}.source_model")
        self.cache_dir: Path | None = None
        self.bad: Counter = Counter()
        self.client = None
        self.runs = self.orphans = self.dropped = 0

    def use_build(self, build) -> None:
        self.sources.use_build(build)  # a photo triple's source is its photo

    def use_cache(self, folder: Path) -> None:
        """Keep the endpoint's replies under ``folder`` (the build's cache): a re-run or a
        resumed run asks for nothing it already got."""
        self.cache_dir = Path(folder)

    def plan(self, triple: dict) -> list[Plan]:
        return plan_triple(triple, self.settings, self.own, self.sources.spec)

    def _client(self):
        from dsbuild.llm.client import RequestCache
        from dsbuild.llm.images import ImageEditClient

        if self.client is None:
            cache = RequestCache(self.cache_dir) if self.cache_dir is not None else None
            self.client = ImageEditClient(self.own, cache, section=SECTION,
                                          params=request_params(self.settings, self.own),
                                          price_per_image=self.own.price_per_image)
        return self.client

    def generate(self, plans: list[Plan]) -> Iterator[Made]:
        client = self._client()
        failed_before = client.stats.failed
        single, session = turns.split(plans)
        yield from self._singles(single)
        yield from self._sessions(session)
        failed = client.stats.failed - failed_before
        if failed:
            errors = "; ".join(dict.fromkeys(client.stats.errors[-3:]))
            raise StageFailed(
                f"{SECTION}: {failed} image edit request(s) to {client.endpoint} failed after "
                f"{self.own.max_retries + 1} attempts ({errors}); the pairs received are "
                "written; run the same command again to ask only for the missing ones")

    def _singles(self, plans: list[Plan]) -> Iterator[Made]:
        from dsbuild.generate.stage import png_bytes

        s = self.settings
        groups: OrderedDict[tuple, list[Plan]] = OrderedDict()
        for p in sorted(plans, key=lambda p: (p.group, p.triple["id"], p.index)):
            groups.setdefault(p.group, []).append(p)
        for chunk in _chunks(list(groups.items()), max(s.batch_size, self.own.concurrency)):
            keys = [key for key, _ in chunk]
            images: dict[tuple, np.ndarray] = {}
            for i in range(0, len(keys), s.batch_size):
                part = keys[i:i + s.batch_size]
                images.update(zip(part, self.sources.make(part), strict=True))
            pngs = {key: png_bytes(im) for key, im in images.items()}
            todo = [p for _, part in chunk for p in part]
            asks = _requests(todo)
            replies = asyncio.run(self._edit_all(
                [(pngs[key[0]], key[1], key[2], key[3]) for key in asks]))
            got = dict(zip(asks, replies, strict=True))
            for plan in todo:
                reply = got[_request_key(plan)]
                if reply is None:  # gave up after its retries (counted as failed)
                    continue
                target, why = self._decode(reply, plan.params.get("n_index", 0))
                if why is not None:
                    self.bad[why] += 1
                    continue
                yield Made(plan, images[plan.group], target, self.sources.id(plan.group),
                           record=self.sources.record(plan.group))

    def _sessions(self, plans: list[Plan]) -> Iterator[Made]:
        """Session runs block by block, turn after turn: one request per node on its
        parent's output PNG; a node whose request failed or whose image is bad has no output,
        and the nodes under it are dropped (counted)."""
        from dsbuild.generate.stage import png_bytes

        s = self.settings
        for block in turns.blocks(plans, self.plan, max(s.batch_size, self.own.concurrency)):
            roots = turns.roots(block, self.sources.make, s.batch_size)
            held = {(r.id, None): roots[r.root] for r in block}
            for step in turns.by_turn(block, only_asked=True):
                todo = [(r, p) for r, p in step if (r.id, p.triple.get("parent_id")) in held]
                self.dropped += len(step) - len(todo)
                asks = [(png_bytes(held[(r.id, p.triple.get("parent_id"))]), p.triple["edit"],
                         p.params["variant"], 1) for r, p in todo]
                replies = asyncio.run(self._edit_all(asks)) if asks else []
                for (run, plan), reply in zip(todo, replies, strict=True):
                    if reply is None:  # gave up after its retries (counted as failed)
                        continue
                    target, why = self._decode(reply)
                    if why is not None:
                        self.bad[why] += 1
                        continue
                    parent = held[(run.id, plan.triple.get("parent_id"))]
                    held[(run.id, plan.triple["id"])] = target
                    if plan.id in run.asked:
                        yield Made(plan, parent, target,
                                   run.node_source_id(plan, self.sources.id(run.root)),
                                   images={"session_source": roots[run.root]},
                                   record=run.record(plan, self.sources.record(run.root)))
            self.runs += sum(1 for r in block if r.asked & {p.id for p in r.plans})
            self.orphans += sum(r.orphans for r in block)

    def _decode(self, reply: dict, index: int = 0) -> tuple[np.ndarray | None, str | None]:
        """The reply's ``index``-th image, checked alone (a reply with fewer images than
        asked: the missing ones are ``no_image``)."""
        from dsbuild.llm.images import decode_image

        s = self.settings
        returned = reply.get("images") or []
        return decode_image(returned[index] if index < len(returned) else None,
                            s.width, s.height)

    async def _edit_all(self, requests: list[tuple[bytes, str, int, int]]
                        ) -> list[dict | None]:
        client = self.client
        async with client:
            tasks = [asyncio.ensure_future(client.edit(png, prompt, variant, n))
                     for png, prompt, variant, n in requests]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict:
        client = self._client()
        return {"sources_made": self.sources.made, **self.sources.cut_stats(),
                "endpoint": client.endpoint,
                "requests": client.stats.as_dict(), "images": client.counts(),
                "bad_images": dict(sorted(self.bad.items())),
                **turns.stats(self.runs, self.orphans,
                              **({"session_turns_dropped": self.dropped} if self.dropped
                                 else {}))}


def _request_key(plan: Plan) -> tuple:
    """The request a pair's image comes from: (source group, instruction, the first variant
    it asks for, images asked). At ``generate.api.n`` = 1 each variant is its own request."""
    p = plan.params
    index = p.get("n_index", 0)
    return (plan.group, plan.triple["edit"], p["variant"] - index, p.get("n", 1))


def _requests(plans: list[Plan]) -> list[tuple]:
    """The distinct requests of ``plans`` in order: the variants of one source and
    instruction that share a request are asked once, together (the whole request even when
    a resumed run misses only some of its pairs, so the cache answers it)."""
    return list(dict.fromkeys(_request_key(p) for p in plans))


def _chunks(groups: list[tuple[tuple, list[Plan]]], size: int):
    """Runs of whole groups holding at least ``size`` edits (the last may hold fewer)."""
    chunk, rows = [], 0
    for key, plans in groups:
        chunk.append((key, plans))
        rows += len(plans)
        if rows >= size:
            yield chunk
            chunk, rows = [], 0
    if chunk:
        yield chunk
