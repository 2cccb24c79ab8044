"""Does a caption mention a vocabulary term? Plurals, synonyms and head nouns count.

The check is deliberately generous: a false "mentioned" only removes one candidate, while a
false "absent" would teach an editor to ignore an instruction about a thing that is there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from dsbuild.config import Agent, Recipe

_WORD = re.compile(r"[a-z0-9]+")
_ARTICLES = frozenset({"a", "an", "the", "some"})


def words(text: str) -> list[str]:
    """Lowercase alphanumeric words; hyphens and punctuation separate words."""
    return _WORD.findall(text.lower())


def bare(term: str) -> str:
    """A vocabulary term without its leading article: recipes list features as "a lower
    shelf", which an instruction writes as "remove the lower shelf"."""
    parts = term.strip().split()
    if len(parts) > 1 and parts[0].lower() in _ARTICLES:
        parts = parts[1:]
    return " ".join(parts)


def key(term: str) -> str:
    """A term compared without case, punctuation or leading article."""
    return " ".join(words(bare(term)))


@lru_cache(maxsize=65536)
def forms(word: str) -> frozenset[str]:
    """Singular and plural spellings of one word (regular English inflection, generously)."""
    w = word.lower()
    out = {w, w + "s", w + "es"}
    if w.endswith("ies") and len(w) > 4:
        out.add(w[:-3] + "y")
    if w.endswith("ves") and len(w) > 4:
        out |= {w[:-3] + "f", w[:-3] + "fe"}
    if w.endswith("es") and len(w) > 3:
        out.add(w[:-2])
    if w.endswith("s") and not w.endswith("ss") and len(w) > 2:
        out.add(w[:-1])
    if w.endswith("y") and len(w) > 2:
        out.add(w[:-1] + "ies")
    if w.endswith("fe"):
        out.add(w[:-2] + "ves")
    elif w.endswith("f"):
        out.add(w[:-1] + "ves")
    return frozenset(out)


def _same(a: str, b: str) -> bool:
    return a == b or bool(forms(a) & forms(b))


def phrase_in(term: str, caption_words: list[str], *, head: bool = True) -> bool:
    """``term`` (one or more words) occurs in the caption; with ``head`` its last word alone
    counts too ("coffee table" is mentioned by "a table"). A leading article is ignored."""
    tw = words(bare(term))
    if not tw:
        return False
    n = len(tw)
    for i in range(len(caption_words) - n + 1):
        if all(_same(t, c) for t, c in zip(tw, caption_words[i:i + n], strict=True)):
            return True
    if head and n > 1:
        return any(_same(tw[-1], c) for c in caption_words)
    return False


class Mentions:
    """Synonym groups of a recipe and a mention test that honours them."""

    def __init__(self, recipe: Recipe):
        self.groups: dict[str, set[str]] = {}
        for agent in recipe.agents:
            for key, syns in agent.vocabulary.synonyms.items():
                self._join([key, *syns])

    def _join(self, terms: Iterable[str]) -> None:
        group: set[str] = set()
        for t in terms:
            t = key(t)
            group |= self.groups.get(t, {t})
        for t in group:
            self.groups[t] = group

    def names_of(self, term: str) -> set[str]:
        """The term and every synonym the recipe gives for it."""
        t = key(term)
        return set(self.groups.get(t, {t}))

    def mentioned(self, term: str, caption: str) -> bool:
        cw = words(caption)
        return any(phrase_in(name, cw) for name in self.names_of(term))


def candidates(agent: Agent) -> list[str]:
    """Things an instruction may name for this agent: room objects, fixtures, features.

    Subjects are left out: "remove the dining chair" on a picture of an armchair names the
    very thing the picture shows.
    """
    v = agent.vocabulary
    seen: dict[str, None] = {}
    for term in [*v.objects, *v.fixtures, *v.features]:
        seen.setdefault(term, None)
    return list(seen)


def present_terms(recipe: Recipe, caption: str, mentions: Mentions) -> list[str]:
    """Every vocabulary term of the recipe (subjects included) that the caption mentions."""
    seen: dict[str, None] = {}
    for a in recipe.agents:
        for t in [*a.vocabulary.subjects, *candidates(a)]:
            if t not in seen and mentions.mentioned(t, caption):
                seen[t] = None
    return list(seen)


def names_any(text: str, terms: Iterable[str], mentions: Mentions) -> bool:
    """``text`` names one of ``terms`` (or a synonym, in any number) as a whole phrase."""
    tw = words(text)
    return any(phrase_in(n, tw, head=False) for t in terms for n in mentions.names_of(t))


def absent_terms(recipe: Recipe, agent: Agent, caption: str, mentions: Mentions,
                 present: list[str] | None = None) -> list[str]:
    """Candidates the caption does not mention; falls back to same-level agents' vocabulary.

    A candidate whose own words name a mentioned thing is left out too ("curtain rod" when the
    caption has curtains): an instruction naming it would name something the caption shows.
    ``present`` (``present_terms`` of the caption) may be passed when already computed.
    """
    if present is None:
        present = present_terms(recipe, caption, mentions)

    def ok(t: str) -> bool:
        return not mentions.mentioned(t, caption) and not names_any(t, present, mentions)

    own = [t for t in candidates(agent) if ok(t)]
    if own:
        return own
    pool: dict[str, None] = {}
    for other in recipe.agents:
        if other.level == agent.level and other.name != agent.name:
            for t in candidates(other):
                pool.setdefault(t, None)
    return [t for t in pool if ok(t)]
