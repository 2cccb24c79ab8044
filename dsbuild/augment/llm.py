"""Misleading instructions from an OpenAI-compatible LLM, checked like the template ones.

The model sees the caption and the recipe things the caption does not mention, and answers
``{"target": ..., "edit": ...}``. A reply is used only when its target is one of those absent
things, the instruction names it, and the instruction names nothing the caption mentions;
otherwise the template writes that sample and the reason is counted. Replies are cached in
the build (``cache/augment``), so a re-run pays for no call twice. Endpoint, model and key
variable are ``augment.*`` settings; retries and timeout are the captions settings'.
"""

from __future__ import annotations

import json
from collections import Counter

from dsbuild.augment.mentions import Mentions, key, names_any, phrase_in, words
from dsbuild.build import Build
from dsbuild.captions.cache import RequestCache
from dsbuild.captions.openai_backend import api_key
from dsbuild.config import Agent
from dsbuild.errors import DsbuildError, require

SYSTEM = (
    "You write image-editing instructions that must leave an image UNCHANGED, to teach an "
    "image editor where not to edit. You get the caption of an image and things that are NOT "
    "in it. Write one short, natural instruction that removes or changes exactly one of those "
    "things (it should sound plausible for this picture). Never mention anything the caption "
    'mentions. Answer with JSON only: {"target": "<one of the absent things>", '
    '"edit": "<the instruction>"}'
)


class LLMInstructions:
    """One chat request per sample (cached); ``instruction`` returns (target, edit) or None."""

    def __init__(self, build: Build, mentions: Mentions):
        openai = require("openai", "llm")
        c, a = build.config.captions, build.config.augment
        self.model = a.model
        self.temperature = a.temperature
        self.client = openai.OpenAI(base_url=a.base_url, api_key=api_key(a),  # type: ignore[arg-type]
                                    max_retries=c.max_retries, timeout=c.timeout)
        self.cache = RequestCache(build.cache_dir / "augment")
        self.mentions = mentions
        self.recipe = build.recipe
        self.rejected: Counter = Counter()
        self.sent = self.cached = 0

    def _ask(self, payload: dict, sample: str) -> str:
        key = self.cache.key(payload, sample)  # type: ignore[arg-type]
        hit = self.cache.get(key)
        if hit is not None:
            self.cached += 1
            return hit["content"]
        import openai

        try:
            resp = self.client.chat.completions.create(**payload)
        except openai.APIError as exc:
            raise DsbuildError(f"augment LLM request failed: {exc}") from None
        self.sent += 1
        content = resp.choices[0].message.content or ""
        self.cache.put(key, {"content": content})
        return content

    def instruction(self, agent: Agent, caption: str, absent: list[str], present: list[str],
                    sample: str) -> tuple[str, str] | None:
        """An LLM-written instruction naming one of ``absent`` and none of ``present``."""
        payload = {
            "model": self.model, "temperature": self.temperature, "max_tokens": 120,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": (
                f"Caption: {caption}\nThings NOT in the image: {', '.join(absent)}")}],
        }
        text = self._ask(payload, sample).strip()
        if text.startswith("```"):
            text = text.strip("`").removeprefix("json").strip()
        try:
            reply = json.loads(text)
            target, edit = str(reply["target"]).strip(), str(reply["edit"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError):
            self.rejected["not JSON with target and edit"] += 1
            return None
        absent_by_key = {key(a): a for a in absent}
        term = absent_by_key.get(key(target))
        if term is None:
            self.rejected["target is not an absent thing"] += 1
            return None
        edit_words = words(edit)
        if not any(phrase_in(n, edit_words, head=False) for n in self.mentions.names_of(term)):
            self.rejected["instruction does not name its target"] += 1
            return None
        if names_any(edit, present, self.mentions):
            self.rejected["instruction names something the caption mentions"] += 1
            return None
        return term, edit

    def stats(self) -> dict:
        return {"sent": self.sent, "cached": self.cached, "rejected": dict(self.rejected)}
