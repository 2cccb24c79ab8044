"""Triples grounded in real photos: which agent writes about which photo, template edits of a
photo's caption, the things an edit is about, and the detector check on the photo.

Things are matched against the agent's vocabulary (objects, features, fixtures, and the
subjects of an object agent), singular or plural (``dsbuild.core.text.forms``), so "two
armchairs" names ``armchair``. The grounding check asks the open-vocabulary detector
(:class:`dsbuild.models.owl.OwlDetector`, verify's) about the prepared photo: a removed,
replaced or changed thing must score at least ``present_min``, an added one at most
``absent_max``; a failed check is a counted rejection (reasons :data:`REASONS`), never a triple.
Scores depend only on the photo and the phrase, so the check is deterministic and a resumed
run decides exactly as the first one did.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Iterator

from dsbuild.core.config import Agent
from dsbuild.core.hashing import content_id
from dsbuild.core.text import article, bare, forms, is_plural_word, with_article, words

REASONS = {
    "photo_input_changed": "photo: the input is not the photo's caption",
    "ground_no_target": "photo: the edit names no thing of the agent's vocabulary",
    "ground_not_in_photo": "photo: the detector does not see the removed/replaced/changed "
                           "thing in the photo",
    "ground_already_in_photo": "photo: the detector already sees the added thing in the photo",
}

_TOKEN = re.compile(r"[a-z0-9][a-z0-9'-]*", re.IGNORECASE)
DETERMINERS = frozenset({"a", "an", "the", "some", "two", "three", "four", "several", "its",
                         "their", "one"})


def things(agent: Agent) -> list[str]:
    """The detectable things of an agent's vocabulary, longest first (for greedy matching)."""
    v = agent.vocabulary
    found = [*v.objects, *v.features, *v.fixtures, *(v.subjects if agent.level == "object"
                                                     else [])]
    uniq = list(dict.fromkeys(bare(t).lower() for t in found if words(t)))
    return sorted(uniq, key=lambda t: (-len(words(t)), t))


def spans(text: str) -> list[tuple[str, int, int]]:
    """(lowercase word, start, end) of each word of a text."""
    return [(m.group(0).lower(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def named(text: str, terms: list[str]) -> list[tuple[str, int, int, bool]]:
    """The terms a text names: (term, first word index, end index, plural), in text order;
    the last word of a term matches any of its singular/plural forms."""
    toks = [w for w, _, _ in spans(text)]
    taken = [False] * len(toks)
    out = []
    for term in terms:
        tw = words(term)
        n = len(tw)
        for i in range(len(toks) - n + 1):
            if any(taken[i:i + n]) or toks[i:i + n - 1] != tw[:-1]:
                continue
            if toks[i + n - 1] in forms(tw[-1]):
                out.append((term, i, i + n, toks[i + n - 1] != tw[-1]
                            and is_plural_word(toks[i + n - 1])))
                taken[i:i + n] = [True] * n
    return sorted(out, key=lambda t: t[1])


def names(text: str, terms: list[str]) -> bool:
    return bool(named(text, terms))


# ------------------------------------------------------------------------------ agents


def assign_photos(agents: list[Agent], photos: list[dict]) -> dict[str, list[dict]]:
    """Photos per agent name. A photo goes to an agent whose subjects its caption names (room
    agents before object agents: "a kitchen with ..." goes to the kitchen agent), several such
    agents taking turns; a photo whose caption names none goes round-robin over the room agents
    (all agents where there are none). Photos are taken in id order, so the assignment does
    not depend on ranks."""
    out: dict[str, list[dict]] = {a.name: [] for a in agents}
    if not agents:
        return out
    rooms = [a for a in agents if a.level == "room"] or list(agents)
    turns: dict[tuple, int] = {}
    for photo in sorted(photos, key=lambda p: p["id"]):
        caption = photo.get("caption") or ""
        for level in ("room", "object"):
            match = [a for a in agents if a.level == level and names(
                caption, [bare(s).lower() for s in a.vocabulary.subjects])]
            if match:
                break
        pool = match or rooms
        key = tuple(a.name for a in pool)
        k = turns.get(key, 0)
        turns[key] = k + 1
        out[pool[k % len(pool)].name].append(photo)
    return out


# ------------------------------------------------------------------------------ template


NEGATIONS = frozenset({"no", "without", "not", "lacking", "missing", "minus", "none", "free"})
UNNEGATED = frozenset({"and", "with", "but", "has", "have"})  # these end a negation's reach


def negation_at(sp, i: int) -> int | None:
    """Index of the negation ('no', 'without', ...) that governs the word at ``i`` in the same
    list item, or None (the validator's reading of "no rug", "without a cushion")."""
    for k in range(i - 1, max(-1, i - 5), -1):
        if sp[k][0] in NEGATIONS:
            return k
        if sp[k][0] in UNNEGATED:
            return None
    return None


class CaptionEditor:
    """Candidate edits of one given caption (validated by the caller): remove, replace or
    change a thing the caption names, add one. For a photo's caption (the default) an add
    appends a thing it does not name. A ``synthetic`` caption (a session's turn: composed, so
    it says what is absent) adds by turning a negated thing present ("no rug" -> "a rug",
    "without a cushion" -> "with a cushion"), as the addition rule wants, sometimes removes by
    negating ("a rug" -> "no rug", which lets a later turn add it back), and never removes,
    replaces or changes a thing it names only negated."""

    def __init__(self, agent: Agent, rng: random.Random, caption: str,
                 synthetic: bool = False):
        self.agent, self.voc = agent, agent.vocabulary
        self.caption = caption
        self.terms = things(agent)
        self.rng = rng
        self.synthetic = synthetic

    def edit(self, op: str) -> dict | None:
        """One candidate of operation ``op`` (None: the caption gives none)."""
        cand = getattr(self, "_" + op)()
        if cand is not None:
            cand["operation"] = op
        return cand

    def _pick_named(self):
        found = named(self.caption, self.terms)
        if self.synthetic:  # "no rug" names no rug to remove, replace or change
            sp = spans(self.caption)
            found = [h for h in found if negation_at(sp, h[1]) is None]
        return self.rng.choice(found) if found else None

    def _absent(self, like: str | None = None) -> str | None:
        """A thing the caption does not name (of the same vocabulary list as ``like``)."""
        here = {t for t, *_ in named(self.caption, self.terms)}
        pool = [t for t in self.terms if t not in here]
        if like is not None:
            v = self.voc
            kin = next((ws for ws in (v.subjects, v.objects, v.features, v.fixtures)
                        if like in {bare(w).lower() for w in ws}), [])
            pool = [t for t in pool if t in {bare(w).lower() for w in kin}]
        return self.rng.choice(sorted(pool)) if pool else None

    def _np_start(self, sp, i: int) -> int:
        """Word index where the noun phrase of the term at ``i`` starts: its determiner and
        the vocabulary's attribute words before it."""
        attrs = {w.lower() for w in (*self.voc.colours, *self.voc.materials, *self.voc.styles)}
        while i > 0 and sp[i - 1][0] in attrs:
            i -= 1
        if i > 0 and sp[i - 1][0] in DETERMINERS:
            i -= 1
        return i

    def _remove(self) -> dict | None:
        hit = self._pick_named()
        if hit is None:
            return None
        term, i, j, _ = hit
        text, sp = self.caption, spans(self.caption)
        first = self._np_start(sp, i)
        start, end = sp[first][1], sp[j - 1][2]
        if (self.synthetic and any(w == "with" for w, *_ in sp[:first])
                and self.rng.random() < 0.5):  # "with a rug" -> "with no rug"
            det = sp[first][0] in DETERMINERS
            out = text[:start] + "no " + text[sp[first + 1][1] if det else start:]
            edit = self.rng.choice(["remove the {t}", "take away the {t}",
                                    "get rid of the {t}"]).format(t=term)
            return {"input": text, "edit": edit, "output": out}
        after = re.match(r"\s*(,|\band\b)\s*", text[end:])
        before = re.search(r"(\s*,\s*|\s+and\s+|\s+with\s+)$", text[:start])
        if after and end + after.end() < len(text):
            head, rest = text[:start], text[end + after.end():]
            if after.group(1) == "and" and re.search(r",\s*$", head):  # "a, b and c" - b
                head = re.sub(r"\s*,\s*$", " and ", head)
            out = head + rest
        elif before:
            out = text[:before.start()] + text[end:]
        else:
            return None
        edit = self.rng.choice(["remove the {t}", "take away the {t}", "get rid of the {t}",
                                "take out the {t}"]).format(t=term)
        return {"input": text, "edit": edit, "output": out}

    def _replace(self) -> dict | None:
        hit = self._pick_named()
        new = self._absent(hit[0]) if hit is not None else None
        if hit is None or new is None or hit[3]:
            return None
        term, i, j, _ = hit
        text, sp = self.caption, spans(self.caption)
        out = text[:sp[i][1]] + new + text[sp[j - 1][2]:]
        subjects = {bare(w).lower() for w in self.voc.subjects}
        if self.synthetic and term not in subjects:  # "a teal leather ottoman" -> "a rug"
            k = self._np_start(sp, i)
            if k < i and sp[k][0] in DETERMINERS and sp[k][0] not in ("a", "an", "the"):
                k += 1  # "two armchairs" keeps its number
            elif k == i - 1 and sp[k][0] not in ("a", "an"):
                k = i
            out = text[:sp[k][1]] + with_article(new) + text[sp[j - 1][2]:]
        elif i > 0 and sp[i - 1][0] in ("a", "an"):  # "a sofa" -> "an armchair"
            k = self._np_start(sp, i)
            if k == i - 1:
                out = out[:sp[i - 1][1]] + article(new) + out[sp[i - 1][2]:]
        edit = self.rng.choice(["replace the {t} with {n}", "swap the {t} for {n}"]).format(
            t=term, n=with_article(new))
        return {"input": text, "edit": edit, "output": out}

    def _change(self) -> dict | None:
        hit = self._pick_named()
        if hit is None:
            return None
        term, i, j, _ = hit
        text, sp = self.caption, spans(self.caption)
        kinds = [k for k, ws in (("colour", self.voc.colours), ("material", self.voc.materials))
                 if len(ws) >= 2]
        if not kinds:
            return None
        kind = self.rng.choice(kinds)
        pool = [w.lower() for w in (self.voc.colours if kind == "colour" else self.voc.materials)]
        if self.synthetic:
            return self._change_np(term, i, kind, pool)
        prev = sp[i - 1] if i > 0 else None
        if prev is not None and prev[0] in pool:
            new = self.rng.choice([w for w in pool if w != prev[0]])
            out = text[:prev[1]] + new + text[prev[2]:]
            first = i - 1
        else:
            new = self.rng.choice(pool)
            out = text[:sp[i][1]] + new + " " + text[sp[i][1]:]
            first = i
        if first > 0 and sp[first - 1][0] in ("a", "an"):
            a0 = sp[first - 1]
            out = out[:a0[1]] + article(new) + out[a0[2]:]
        edit = (f"make the {term} {new}" if kind == "colour" else f"make the {term} out of {new}")
        return {"input": text, "edit": edit, "output": out}

    def _add(self) -> dict | None:
        if self.synthetic:
            return self._add_negated()
        new = self._absent()
        if new is None:
            return None
        text = self.caption
        joiner = " and " if re.search(r"\bwith\b", text) else " with "
        text_out = text
        thing = with_article(new)
        edit = self.rng.choice(["add {n}", "put {n} in the room", "place {n} in the room"]
                               if self.agent.level == "room" else ["add {n}"]).format(n=thing)
        return {"input": text, "edit": edit, "output": text_out + joiner + thing}


    def _change_np(self, term: str, i: int, kind: str, pool: list[str]) -> dict:
        """Change a thing's colour or material in a composed caption: swap the word of that
        kind in its noun phrase, else put one in its place (a colour before the materials, a
        material just before the thing: "a rustic green oak chair")."""
        text, sp = self.caption, spans(self.caption)
        first = self._np_start(sp, i)
        if first < i and sp[first][0] in DETERMINERS:
            first += 1
        mats = {w.lower() for w in self.voc.materials}
        have = [k for k in range(first, i) if sp[k][0] in pool]
        if have:
            k = have[-1]
            new = self.rng.choice([w for w in pool if w != sp[k][0]])
            out = text[:sp[k][1]] + new + text[sp[k][2]:]
        else:
            new = self.rng.choice(pool)
            k = i if kind == "material" else next(
                (m for m in range(first, i) if sp[m][0] in mats), i)
            out = text[:sp[k][1]] + new + " " + text[sp[k][1]:]
        if k > 0 and k == first and sp[k - 1][0] in ("a", "an"):
            a0 = sp[k - 1]
            out = out[:a0[1]] + article(new) + out[a0[2]:]
        edit = (self.rng.choice(["make the {t} {n}", "paint the {t} {n}", "turn the {t} {n}"])
                if kind == "colour" else
                self.rng.choice(["make the {t} out of {n}", "use {n} for the {t}"])
                ).format(t=term, n=new)
        return {"input": text, "edit": edit, "output": out}

    def _add_negated(self) -> dict | None:
        """Add a thing the caption says is absent: "and no rug" -> "and a rug" (sometimes a
        coloured one), "without a cushion" -> "with a cushion"."""
        text, sp = self.caption, spans(self.caption)
        hits = [(h, k) for h in named(text, self.terms)
                if (k := negation_at(sp, h[1])) is not None and sp[k][0] in ("no", "without")]
        if not hits:
            return None
        (term, i, j, plural), k = self.rng.choice(hits)
        m = k + 1
        if m < i and sp[m][0] in ("a", "an", "any", "some"):
            m += 1
        phrase = text[sp[m][1]:sp[j - 1][2]]
        if m == i and self.voc.colours and self.rng.random() < 0.3:
            phrase = f"{self.rng.choice(self.voc.colours).lower()} {phrase}"
        thing = with_article(phrase)
        joiner = "with " if sp[k][0] == "without" else ""
        out = text[:sp[k][1]] + joiner + thing + text[sp[j - 1][2]:]
        edit = self.rng.choice(["add {n}", "put {n} in the room", "place {n} in the room"]
                               if self.agent.level == "room" else ["add {n}"]).format(n=thing)
        return {"input": text, "edit": edit, "output": out}


class PhotoComposer(CaptionEditor):
    """Endless stream of candidate triples editing one photo's caption (validated by the
    caller): remove, replace or change a thing the caption names, add one it does not."""

    MAX_EMPTY_DRAWS = 200

    def __init__(self, agent: Agent, seed: int, caption: str, photo_id: str):
        super().__init__(agent, random.Random(content_id("photo-template", seed, agent.name,
                                                         photo_id)), caption)

    def candidates(self) -> Iterator[dict]:
        """Candidates; stops when the caption gives nothing to edit for the agent."""
        ops = list(self.agent.operations)
        empty = 0
        while empty < self.MAX_EMPTY_DRAWS:
            cand = self.edit(self.rng.choice(ops))
            if cand is None:
                empty += 1
                continue
            empty = 0
            yield cand


# ------------------------------------------------------------------------------ targets


def edit_targets(op: str, inp: str, out: str, terms: list[str]) -> dict:
    """The things an edit is about: ``old`` (named more often in the input), ``new`` (more
    often in the output) and, for a change, the ``thing`` next to the changed words."""
    n_in, n_out = named(inp, terms), named(out, terms)
    c_in, c_out = {}, {}
    for t, *_ in n_in:
        c_in[t] = c_in.get(t, 0) + 1
    for t, *_ in n_out:
        c_out[t] = c_out.get(t, 0) + 1
    old = [t for t in c_in if c_in[t] > c_out.get(t, 0)]
    new = [t for t in c_out if c_out[t] > c_in.get(t, 0)]
    thing = None
    if op == "change":
        a, b = words(inp), [w for w, _, _ in spans(out)]
        changed = [j1 for tag, _, _, j1, j2 in difflib.SequenceMatcher(
            a=a, b=b, autojunk=False).get_opcodes() if tag != "equal"]
        both = [h for h in n_out if h[0] in c_in]
        near = [h for h in both for j in changed if j <= h[1] <= j + 3]
        thing = (near or both or [(None,)])[0][0]
    return {"old": old if op in ("remove", "replace") else [],
            "new": new if op in ("add", "replace") else [], "thing": thing}


def ground_check(op: str, targets: dict, scores: dict[str, float], present_min: float,
                 absent_max: float) -> str | None:
    """The rejection reason of one triple on its photo, or None when it is grounded."""
    if op == "change":
        must = [targets["thing"]] if targets.get("thing") else []
        absent: list[str] = []
    else:
        must = list(targets["old"])
        absent = list(targets["new"]) if op == "add" else []
    if not must and not absent:
        return "ground_no_target"
    if any(scores[p] < present_min for p in must):
        return "ground_not_in_photo"
    if any(scores[p] > absent_max for p in absent):
        return "ground_already_in_photo"
    return None


def queried(op: str, targets: dict) -> list[str]:
    """Phrases the check asks the detector about."""
    if op == "change":
        return [targets["thing"]] if targets.get("thing") else []
    return [*targets["old"], *(targets["new"] if op == "add" else [])]


class PhotoGrounder:
    """The detector scores of phrases on photos (best box score), each (photo, phrase) once."""

    def __init__(self, build, detector=None, quiet: bool = False):
        self.build = build
        self.detector = detector
        self.quiet = quiet
        self.scores: dict[str, dict[str, float]] = {}
        self.pixels: dict[str, object] = {}

    def _detector(self):
        if self.detector is None:
            from dsbuild.models import keep_loaded, model_key
            from dsbuild.models.owl import OwlDetector

            s = self.build.config.captions.photos
            name = self.build.config.verify.detector if s.detector == "auto" else s.detector
            setting = "verify.detector" if s.detector == "auto" else "captions.photos.detector"
            self.detector = keep_loaded(
                "captions-detector", (*model_key(name), s.device),
                lambda: OwlDetector.load(name, s.device, "fp32", quiet=self.quiet,
                                         setting=setting))
        return self.detector

    def score(self, photo: dict, phrases: list[str]) -> dict[str, float]:
        """Best box score of each phrase on the prepared photo."""
        from PIL import Image

        from dsbuild.core.photos import load_photo

        have = self.scores.setdefault(photo["id"], {})
        new = [p for p in dict.fromkeys(phrases) if p not in have]
        if new:
            det = self._detector()
            px = self.pixels.get(photo["id"])
            if px is None:
                arr = load_photo(self.build, photo)
                im = Image.fromarray((arr * 255).round().astype("uint8"))
                px = det.image_processor(images=im, return_tensors="pt")["pixel_values"]
                self.pixels = {photo["id"]: px}  # photos come one after another
            sc, _ = det.run(px, new)
            for q, p in enumerate(new):
                have[p] = round(float(sc[0, :, q].max()), 6)
        return {p: have[p] for p in phrases}
