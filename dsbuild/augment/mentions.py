"""Does a caption mention a vocabulary term? Plurals, synonyms and head nouns count.

The check is deliberately generous: a false "mentioned" only removes one candidate, while a
false "absent" would teach an editor to ignore an instruction about a thing that is there.
"""

from __future__ import annotations

from collections.abc import Iterable

from dsbuild.core.config import Agent, Recipe
from dsbuild.core.text import bare, forms
from dsbuild.core.text import words as text_words


def words(text: str) -> list[str]:
    """The shared tokeniser's words, cut at inner hyphens and apostrophes: "four-poster bed"
    mentions "four poster beds" (generous, as every check here)."""
    return text_words(text, split_joined=True)


def key(term: str) -> str:
    """A term compared without case, punctuation or leading article."""
    return " ".join(words(bare(term)))


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
