"""Plain-English text helpers every stage and report shares: one word tokeniser, one comparison
key, articles, plurals and uncountable nouns.

Articles and inflection come from ``inflect`` (loaded on first use); this module only adds what
it lacks: numerals read as words ("an 8-seater"), uncountable nouns ("with wall art"), and the
singular nouns ending in -s that its ``singular_noun`` would strip ("canvas", "cactus").
"""

from __future__ import annotations

import re
import sys
import types
from functools import lru_cache

TOKENISATION = (
    "lowercase; a token is a run of letters/digits, joined by an apostrophe or hyphen inside a "
    "word (mid-century, children's, 3-seater, 2 stay whole); all other punctuation separates "
    "tokens and is dropped; curly apostrophes and unicode hyphens count as ' and -"
)

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_PART = re.compile(r"[^\W_]+")
_UNIFY = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2010": "-",
                        "\u2011": "-"})

ARTICLES = frozenset({"a", "an", "the", "some"})

# uncountable heads take no article: "with wall art", "with wainscoting"
MASS_NOUNS = frozenset(
    "art artwork wainscoting panelling paneling wallpaper shelving lighting flooring tiling "
    "bedding seating storage decor décor greenery furniture carpeting linen cabinetry "
    "millwork moulding molding trim".split())

# words that are no plural noun although inflect's singular_noun, which assumes a plural, would
# singularise them: nouns in -s ("canvas" -> "canva"), function words ("has" -> "ha") and plural
# pronouns ("they" -> "it"). Words ending in -ss inflect gets right itself.
NOT_PLURAL_NOUNS = frozenset(
    "canvas lens atlas bias gas alias chaos pampas christmas iris trellis chassis "
    "as is was has does its his hers ours yours theirs this thus yes always perhaps whereas "
    "they them their these those we our ourselves yourselves themselves".split())


def words(text: str, *, split_joined: bool = False) -> list[str]:
    """Lowercase word tokens (see ``TOKENISATION``); ``split_joined`` also cuts a word at its
    inner hyphens and apostrophes ("four-poster" -> "four", "poster"), for generous matching."""
    text = str(text).lower().translate(_UNIFY)
    return (_PART if split_joined else _WORD).findall(text)


def normalise(text: str) -> str:
    """A text as compared for sameness: its words joined by one space, "an" read as "a"
    (case, punctuation, spacing and a/an never make two captions different)."""
    return " ".join("a" if w == "an" else w for w in words(text))


def bare(phrase: str) -> str:
    """The phrase without a leading article ("a lower shelf" -> "lower shelf"); a lone word
    stays."""
    parts = str(phrase).strip().split()
    if len(parts) > 1 and parts[0].lower() in ARTICLES:
        parts = parts[1:]
    return " ".join(parts)


def head(phrase: str) -> str:
    """The noun an article agrees with: the last word before any "of" ("chest of drawers" ->
    "chest", "built-in shelves" -> "shelves"); "" for a phrase with no words."""
    found = words(re.split(r"\s+of\s+", str(phrase).strip(), maxsplit=1)[0])
    return found[-1] if found else ""


@lru_cache(maxsize=1)
def _inflect():
    """The inflect module, imported with typeguard's ``@typechecked`` as a no-op: inflect 7
    instruments 23 methods at import, reparsing its own source each time (a second or more,
    jaraco/inflect#212), only to check arguments that are always non-empty str here."""
    if "inflect" in sys.modules:
        return sys.modules["inflect"]
    real = sys.modules.get("typeguard")
    stub = types.ModuleType("typeguard")
    stub.typechecked = lambda target=None, **_: target if target is not None else (lambda f: f)
    sys.modules["typeguard"] = stub
    try:
        import inflect
    finally:
        if real is None:
            sys.modules.pop("typeguard", None)
        else:
            sys.modules["typeguard"] = real
    return inflect


@lru_cache(maxsize=1)
def _engine():
    return _inflect().engine()


@lru_cache(maxsize=1)
def _classical():
    engine = _inflect().engine()
    engine.classical(all=True)
    return engine


_NOUN = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


@lru_cache(maxsize=65536)
def is_plural_word(word: str) -> bool:
    """Whether one word is a plural noun ("shelves", "mice", "children"; not "glass",
    "cactus", "series"). Singulars in -us/-is are taken as singular, as they mostly are."""
    w = word.lower()
    if not _NOUN.fullmatch(w) or w in NOT_PLURAL_NOUNS or w.endswith(("us", "is")):
        return False
    one = _engine().singular_noun(w)
    return bool(one) and one != w


def is_plural(phrase: str) -> bool:
    """Whether a noun phrase's head is plural ("throw pillows", "a pair of chairs" is not)."""
    return is_plural_word(head(phrase))


def is_mass(phrase: str) -> bool:
    """Whether a noun phrase's head is uncountable ("wall art", "oak panelling")."""
    return head(phrase) in MASS_NOUNS


@lru_cache(maxsize=65536)
def singular(word: str) -> str:
    """The singular of a plural noun, any other word as it is (lowercase)."""
    w = word.lower()
    return _engine().singular_noun(w) if is_plural_word(w) else w


@lru_cache(maxsize=65536)
def plural(word: str) -> str:
    """The plural of a singular noun ("shelf" -> "shelves"); a plural stays as it is."""
    w = word.lower()
    if not _NOUN.fullmatch(w) or is_plural_word(w):
        return w
    return _engine().plural_noun(w)


@lru_cache(maxsize=65536)
def forms(word: str) -> frozenset[str]:
    """Every singular and plural spelling of one word, for "does this text mention that
    thing", generously: modern and classical plurals ("cactus": "cacti"), the word read both
    as a singular and as a plural ("menus": "menu"), and -s/-es added or dropped, so a
    misspelt plural ("headrestes", "armrestss") still counts."""
    w = word.lower()
    one = singular(w)
    out = {w, one, plural(one)}
    if _NOUN.fullmatch(w):
        raw = _engine().singular_noun(w)
        out |= {_classical().plural_noun(one), w + "s", w + "es", *([raw] if raw else [])}
        out |= {w[:-n] for n in (1, 2) if len(w) > n + 2 and w.endswith("es"[-n:])}
    return frozenset(out)


_LEADING_NUMBER = re.compile(r"\d+")


def article(phrase: str) -> str:
    """ "a" or "an" for how the phrase's first word sounds ("an hour", "a unicorn",
    "a one-seater", "an 8-seater", "an art deco look")."""
    m = _WORD.search(str(phrase).translate(_UNIFY))
    return _article_of(m.group()) if m else "a"


@lru_cache(maxsize=65536)
def _article_of(first: str) -> str:
    num = _LEADING_NUMBER.match(first)
    if num:  # inflect reads digits letter by letter ("a 8"); say the number instead
        first = _engine().number_to_words(num.group())
    return _engine().a(first).split()[0].lower()


def with_article(phrase: str) -> str:
    """The phrase with its indefinite article ("an oak table"); plural and uncountable heads
    stay bare ("throw pillows", "wall art"), a leading article is replaced."""
    phrase = bare(phrase)
    if not phrase or is_plural(phrase) or is_mass(phrase):
        return phrase
    return f"{article(phrase)} {phrase}"
