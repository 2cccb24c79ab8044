"""The object phrase(s) an editing instruction refers to, read from its own grammar.

Shared by the localized edit (dsbuild/localize/referring.py, the rules behind its LLM agent)
and the generators that segment an edit's region (generate's inpaint generator), so neither
imports the other: "remove the lamp" -> ["lamp"], "add a vase on the table" -> ["table"] (an
added object refers to where it goes), "make it winter" -> [].
"""

from __future__ import annotations

from dsbuild.core.text import ARTICLES, words

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
