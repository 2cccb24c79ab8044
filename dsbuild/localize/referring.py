"""The referring expression: which object(s) of the input image an instruction is about.

An LLM agent (the shared OpenAI-compatible ``ChatClient``: concurrency, retries, the request
cache, usage stats) reads the instruction with a few worked examples and answers JSON
``{"objects": [...]}``: "make the right blue chair red" -> ["right blue chair"]; an edit of
the whole image ("make it winter") -> []. Offline, or when a reply is unusable, the rules of
``referred_by_rules`` read the instruction's own grammar (verb, object, "with"/"to"/"into").
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dsbuild.core.referring import referred_by_rules
from dsbuild.core.text import words
from dsbuild.llm.settings import LLMSettings

SYSTEM = (
    "You read an image-editing instruction and name the object(s) of the INPUT image that the "
    "edit changes, as short referring phrases copied from the instruction (keep words that "
    "pick one object out, such as 'right' or 'blue'; drop articles). For an added object, "
    "name the object it is placed on or next to, if any. For an edit of the whole image "
    '(style, season, lighting) answer an empty list. Answer JSON only: {"objects": [...]}'
)
EXAMPLES = (
    ("remove the lamp", ["lamp"]),
    ("make the right blue chair red", ["right blue chair"]),
    ("replace the sofa with a leather couch", ["sofa"]),
    ("add a vase on the dining table", ["dining table"]),
    ("take away the rug and the floor lamp", ["rug", "floor lamp"]),
    ("make it look like winter", []),
)
MAX_WORDS = 8


@dataclass
class Referring:
    """The referred phrases of one instruction and where they came from."""

    phrases: list[str]
    source: str  # "llm", "rules", "rules (llm reply unusable)", "user"


def messages(instruction: str) -> list[dict]:
    """The few-shot chat: the rules, worked examples, then the instruction."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for text, objects in EXAMPLES:
        msgs.append({"role": "user", "content": text})
        msgs.append({"role": "assistant", "content": json.dumps({"objects": objects})})
    msgs.append({"role": "user", "content": instruction})
    return msgs


def parse(content: str) -> list[str] | None:
    """The phrases of a reply, or None when it is not ``{"objects": [short strings]}``."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", content.strip())
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    objects = data.get("objects") if isinstance(data, dict) else None
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        return None
    out = [" ".join(words(o)) for o in objects]
    if any(not o or len(o.split()) > MAX_WORDS for o in out):
        return None
    return list(dict.fromkeys(out))


@dataclass
class ReferringAgent:
    """Asks the LLM for each instruction's referred objects; rules where it cannot."""

    settings: LLMSettings | None = None  # None: rules only (offline)
    cache_dir: Path | None = None
    stats: dict = field(default_factory=dict)

    def __call__(self, instructions: list[str]) -> list[Referring]:
        if self.settings is None:
            return [Referring(referred_by_rules(t), "rules") for t in instructions]
        replies = asyncio.run(self._ask(instructions))
        out = []
        for text, reply in zip(instructions, replies, strict=True):
            phrases = parse(reply["content"]) if reply else None
            out.append(Referring(phrases, "llm") if phrases is not None else
                       Referring(referred_by_rules(text), "rules (llm reply unusable)"))
        return out

    async def _ask(self, instructions: list[str]) -> list[dict | None]:
        from dsbuild.llm.client import ChatClient, RequestCache, check_endpoint

        check_endpoint(self.settings, "localize.llm", "leave out the LLM to use the rules")
        cache = RequestCache(self.cache_dir) if self.cache_dir else None
        async with ChatClient(self.settings, cache, section="localize.llm") as client:
            replies = [r async for r in client.complete_in_order(
                [(messages(t), "referring") for t in instructions])]
            self.stats = client.stats.as_dict()
        return replies
