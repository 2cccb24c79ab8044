"""The shared text helpers (dsbuild/core/text.py), on the cases the hand-rolled versions got wrong:
irregular plurals, articles by sound, numerals, uncountables, singular nouns in -s."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from dsbuild.augment.mentions import phrase_in, words
from dsbuild.captions.template import TemplateComposer
from dsbuild.captions.validate import Validator
from dsbuild.core.config import Agent
from dsbuild.core.split import caption_key
from dsbuild.core.text import (
    article,
    bare,
    forms,
    is_plural,
    normalise,
    plural,
    singular,
    with_article,
)
from dsbuild.core.text import words as text_words


def test_one_tokeniser_keeps_joined_words_and_reads_unicode():
    assert text_words("A Mid‑century chair, the children’s 3-seater; 2 décor-rich rooms!") == [
        "a", "mid-century", "chair", "the", "children's", "3-seater", "2", "décor-rich", "rooms"]
    # the old validator tokeniser was ASCII-only: "décor" came out as "d", "cor"
    assert text_words("décor") == ["décor"]
    assert text_words("four-poster bed", split_joined=True) == ["four", "poster", "bed"]
    assert words("children's four-poster") == ["children", "s", "four", "poster"]


@pytest.mark.parametrize(("phrase", "want"), [
    ("hour", "an"), ("honest look", "an"), ("unicorn lamp", "a"), ("one-seater", "a"),
    ("european chair", "a"), ("umbrella stand", "an"), ("art deco look", "an"),
    ("8-seater table", "an"), ("11-piece set", "an"), ("18th-century desk", "an"),
    ("3-seater sofa", "a"), ("oak table", "an"), ("rug", "a"), ("x-ray lamp", "an"),
])
def test_article_follows_the_sound_not_the_letter(phrase, want):
    """The hand-rolled rule (first letter a/e/i/o/u) said "a hour", "an unicorn", "an
    one-seater", "an european", "a 8-seater"."""
    assert article(phrase) == want


@pytest.mark.parametrize(("phrase", "want"), [
    ("oak table", "an oak table"),
    ("hourglass", "an hourglass"),
    ("throw pillows", "throw pillows"),
    ("mice", "mice"),  # irregular plurals: the old rule (ends in -s) said "a mice"
    ("children", "children"),
    ("geese", "geese"),
    ("glass", "a glass"),  # singular nouns in -s stay singular
    ("cactus", "a cactus"),
    ("canvas", "a canvas"),  # the old rule read it as a plural
    ("series of shelves", "a series of shelves"),
    ("chest of drawers", "a chest of drawers"),
    ("pair of chairs", "a pair of chairs"),
    ("wall art", "wall art"),  # uncountables take no article
    ("oak panelling", "oak panelling"),
    ("wainscoting", "wainscoting"),
    ("an rug", "a rug"),  # a leading article is replaced
    ("some cushions", "cushions"),
    ("", ""),
])
def test_with_article(phrase, want):
    assert with_article(phrase) == want


@pytest.mark.parametrize(("one", "many"), [
    ("shelf", "shelves"), ("knife", "knives"), ("leaf", "leaves"), ("mouse", "mice"),
    ("child", "children"), ("person", "people"), ("box", "boxes"), ("glass", "glasses"),
    ("bench", "benches"), ("story", "stories"), ("drawer", "drawers"), ("canvas", "canvases"),
])
def test_singular_and_plural_round_trip(one, many):
    assert plural(one) == many and singular(many) == one
    assert singular(one) == one and plural(many) == many
    assert is_plural(many) and not is_plural(one)


@pytest.mark.parametrize("word", ["glass", "cactus", "bus", "series", "species", "has", "this",
                                  "its", "they", "3-seater", "children's", "décor"])
def test_singular_leaves_what_is_no_plural_noun(word):
    """inflect's singular_noun assumes a plural ("has" -> "ha", "they" -> "it")."""
    assert singular(word) == word


def test_forms_match_irregular_and_hyphenated_mentions():
    assert "mice" in forms("mouse") and "mouse" in forms("mice")
    assert "cacti" in forms("cactus")  # classical plural, generously
    assert "menu" in forms("menus")  # a plural in -us, read as a plural too
    assert phrase_in("mouse", words("a kitchen with two mice"))
    assert phrase_in("child", words("a bedroom for children"))
    assert phrase_in("four-poster bed", words("a four poster bed"), head=False)
    assert not phrase_in("rug", words("a rugged floor"))


def test_normalise_is_the_comparison_key():
    assert normalise("A sofa,  a rug.") == normalise("a sofa a rug") == "a sofa a rug"
    assert normalise("an oak table") == normalise("a oak table")
    # the split compares captions the same way: punctuation no longer makes two captions
    assert caption_key("A modern living room, with a rug.") == caption_key(
        "a modern living room with a rug")
    assert caption_key("a red rug") != caption_key("a blue rug")


def test_bare_drops_only_a_leading_article():
    assert bare("a lower shelf") == "lower shelf"
    assert bare("the sofa") == "sofa"
    assert bare("a") == "a"
    assert bare("tea table") == "tea table"


def test_validator_matches_irregular_plurals():
    """A removal of "the geese" when the input has "a goose": the old stemmer ("geese" stays
    "geese") rejected it as remove_not_in_input."""
    v = Validator()
    res = v.check({"input": "a garden bench with a goose", "edit": "remove the geese",
                   "output": "a garden bench"})
    assert res.ok, res.reason
    res = v.check({"input": "a pantry with two mice and a shelf", "edit": "remove the mouse",
                   "output": "a pantry with a shelf"})
    assert res.ok, res.reason


def test_template_captions_use_articles_by_sound_and_no_article_on_uncountables():
    ex = {"input": "a modern hallway with a rug", "edit": "add an umbrella stand",
          "output": "a modern hallway with a rug and an umbrella stand", "operation": "add"}
    agent = Agent(name="odd", level="room", context="rooms with odd things", count=1,
                  examples=[ex], vocabulary={
                      "subjects": ["hallway", "hotel lobby"], "styles": ["modern", "eclectic"],
                      "colours": ["red", "ochre"], "materials": ["oak", "unlacquered brass"],
                      "objects": ["hourglass", "one-seater sofa", "8-seater table", "wall art",
                                  "umbrella stand", "throw pillows", "unicorn lamp"]})
    gen = TemplateComposer(agent, seed=3).candidates()
    texts = " | ".join(t for c in (next(gen) for _ in range(400))
                       for t in (c["input"], c["output"], c["edit"]))
    for wrong in ("a hourglass", "an one-seater", "a 8-seater", "a wall art", "a throw pillows",
                  "an unicorn", "a umbrella", "a oak", "an hotel", "a unlacquered",
                  "a eclectic"):
        assert not re.search(rf"\b{wrong}\b", texts), wrong
    for right in ("an hourglass", "a one-seater", "an 8-seater", "with wall art",
                  "a unicorn lamp", "an umbrella stand", "a hotel lobby", "an eclectic"):
        assert right in texts, right


def test_importing_inflect_leaves_typeguard_alone():
    """dsbuild.core.text imports inflect with typeguard's decorator stubbed (import time); the stub
    must not stay behind, and a typeguard imported before must be the same module after."""
    code = ("import typeguard, sys\nfrom dsbuild.core.text import singular\n"
            "assert singular('shelves') == 'shelf'\n"
            "assert sys.modules['typeguard'] is typeguard and typeguard.typechecked.__module__ "
            "!= 'dsbuild.core.text'\n"
            "del sys.modules['typeguard']\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys\nfrom dsbuild.core.text import plural\nassert plural('mouse') == 'mice'\n"
            "assert 'typeguard' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_p2p_token_weights_split_chosen_words_as_clip_splits_them():
    """Blend/reweight words are split by the shared tokeniser into CLIP's word pieces: the old
    whitespace split kept "mid-century" and "rug," whole and matched no CLIP word."""
    torch = pytest.importorskip("torch")
    from dsbuild.attention.align import Word, token_weights

    clip_words = [Word("a", [1]), Word("mid", [2]), Word("-", [3]), Word("century", [4]),
                  Word("rug", [5, 6])]
    got = token_weights(clip_words, ["Mid-century", "rug,"], 8, value=2.0)
    assert torch.equal(got, torch.tensor([0, 0, 2, 0, 2, 2, 2, 0], dtype=got.dtype))
