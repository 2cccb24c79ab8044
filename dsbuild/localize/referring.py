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

from dsbuild.core.text import ARTICLES, words
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

VERBS = frozenset(
    "add put place include insert remove delete erase take get rid away off out replace swap "
    "exchange turn change make paint give restyle recolor recolour colour color use let have "
    "please transform convert".split())
PLACING = frozenset("add put place include insert".split())
# words after which the referred phrase has ended ("the sofa [with] a couch", "[on] the table")
ENDS = frozenset(
    "with for to into in on at by near next beside under above behind from that which is are "
    "so as instead while where like look looks appear seem feel".split())
PLACES = ("on", "onto", "next", "beside", "near", "under", "above", "behind", "in", "at")
ATTRIBUTES = frozenset(
    "color colour material style pattern texture finish shape size fabric wood top".split())
COLOURING = frozenset("paint color colour recolor recolour turn".split())
COLOURS = frozenset(
    "red orange yellow green blue purple violet pink brown black white grey gray beige cream "
    "gold golden silver navy teal turquoise ivory".split())


@dataclass
class Referring:
    """The referred phrases of one instruction and where they came from."""

    phrases: list[str]
    source: str  # "llm", "rules", "rules (llm reply unusable)", "user"


def _phrases(ws: list[str]) -> list[str]:
    """Noun phrases of a word run split at "and"/"," and articles dropped."""
    out, cur = [], []
    for w in [*ws, "and"]:
        if w in ("and", "or"):
            if cur:
                out.append(" ".join(cur))
            cur = []
        elif w not in ARTICLES and w not in ("its", "their", "his", "her"):
            cur.append(w)
    return out


def referred_by_rules(instruction: str) -> list[str]:
    """The object phrase(s) by the instruction's grammar: the words after the leading verbs up
    to "with"/"to"/"into"/a preposition; for "add X on Y", Y; for "make X red", X without its
    complement; "the colour of X" is X. [] when nothing is named ("make it winter")."""
    ws = words(instruction)
    i = 0
    while i < len(ws) and ws[i] in VERBS:
        i += 1
    lead = set(ws[:i])
    j = i
    while j < len(ws) and ws[j] not in ENDS:
        j += 1
    obj = ws[i:j]
    if lead & PLACING:  # the added thing is not in the input: refer to where it goes
        k = next((n for n in range(j, len(ws)) if ws[n] in PLACES), None)
        if k is None:
            return []
        k += 1
        while k < len(ws) and ws[k] in ("to", "of", "the", "a", "an"):
            k += 1
        m = k
        while m < len(ws) and ws[m] not in ENDS:
            m += 1
        return _phrases(ws[k:m])
    while obj and obj[0] in ARTICLES:
        obj = obj[1:]
    if obj and obj[0] in ATTRIBUTES and "of" in obj:  # "the colour of the rug" -> "rug"
        obj = obj[obj.index("of") + 1:]
    if j == len(ws) and len(obj) > 1 and ("make" in lead or (lead & COLOURING
                                                                and obj[-1] in COLOURS)):
        obj = obj[:-1]  # "make the sofa leather", "paint the walls green": drop the complement
    return [p for p in _phrases(obj) if p not in ("it", "this", "that", "everything", "image",
                                                  "picture", "photo", "scene", "room")]


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
