"""Misleading instructions from an OpenAI-compatible LLM, checked like the template ones.

The model sees the caption and the recipe things the caption does not mention, and answers
``{"target": ..., "edit": ...}``. A reply is used only when its target is one of those absent
things, the instruction names it, and the instruction names nothing the caption mentions;
otherwise the template writes that sample and the reason is counted. Requests go through the
shared ``dsbuild.llm.client.ChatClient`` (``augment.*`` settings: endpoint, concurrency, retries) and
are cached in the build (``cache/augment``), so a re-run pays for no call twice.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from dsbuild.augment.mentions import Mentions, key, names_any, phrase_in, words
from dsbuild.core.build import Build
from dsbuild.llm.client import ChatClient, RequestCache

OFFLINE_HINT = "or set augment.backend=template"
SYSTEM = (
    "You write image-editing instructions that must leave an image UNCHANGED, to teach an "
    "image editor where not to edit. You get the caption of an image and things that are NOT "
    "in it. Write one short, natural instruction that removes or changes exactly one of those "
    "things (it should sound plausible for this picture). Never mention anything the caption "
    'mentions. Answer with JSON only: {"target": "<one of the absent things>", '
    '"edit": "<the instruction>"}'
)


@dataclass(frozen=True)
class Ask:
    """One request: the caption, the absent things shown to the model, the things the caption
    shows (which the answer must not name), and the sample key that names its cache entry."""

    caption: str
    absent: list[str]
    present: list[str]
    sample: str

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": (
            f"Caption: {self.caption}\nThings NOT in the image: {', '.join(self.absent)}")}]


class LLMInstructions:
    """Asks the LLM for many samples at once; each reply checked into (target, edit) or None."""

    def __init__(self, build: Build, mentions: Mentions):
        self.client = ChatClient(build.config.augment, RequestCache(build.cache_dir / "augment"),
                                 section="augment", offline_hint=OFFLINE_HINT)
        self.mentions = mentions
        self.rejected: Counter = Counter()

    @property
    def model(self) -> str:
        return self.client.model

    def answer(self, asks: Sequence[Ask],
               emit: Callable[[int, tuple[str, str] | None], None]) -> None:
        """Send every request (``augment.concurrency`` at a time) and call ``emit(i, got)`` in
        the order of ``asks``, so the output is the same at any concurrency. ``got`` is the
        checked instruction or None (rejected: the template writes it); a request that failed
        after its retries is not emitted; the stats count it and a re-run asks again."""
        asyncio.run(self._answer(asks, emit))

    async def _answer(self, asks: Sequence[Ask],
                      emit: Callable[[int, tuple[str, str] | None], None]) -> None:
        async with self.client:
            replies = self.client.complete_in_order([(a.messages(), a.sample) for a in asks])
            async with aclosing(replies):
                i = 0
                async for reply in replies:
                    if reply is not None:
                        emit(i, self.check(asks[i], reply["content"]))
                    i += 1

    def check(self, ask: Ask, text: str) -> tuple[str, str] | None:
        """An LLM-written instruction naming one of ``ask.absent`` and none of ``ask.present``."""
        text = text.strip()
        if text.startswith("```"):
            text = text.strip("`").removeprefix("json").strip()
        try:
            reply = json.loads(text)
            target, edit = str(reply["target"]).strip(), str(reply["edit"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError):
            self.rejected["not JSON with target and edit"] += 1
            return None
        absent_by_key = {key(a): a for a in ask.absent}
        term = absent_by_key.get(key(target))
        if term is None:
            self.rejected["target is not an absent thing"] += 1
            return None
        edit_words = words(edit)
        if not any(phrase_in(n, edit_words, head=False) for n in self.mentions.names_of(term)):
            self.rejected["instruction does not name its target"] += 1
            return None
        if names_any(edit, ask.present, self.mentions):
            self.rejected["instruction names something the caption mentions"] += 1
            return None
        return term, edit

    @property
    def failed(self) -> int:
        return self.client.stats.failed

    def stats(self) -> dict:
        """The client's request stats (sent, cached, retries, failed, tokens) + rejections."""
        return {**self.client.stats.as_dict(), "rejected": dict(self.rejected)}
