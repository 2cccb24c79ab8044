"""What an edit is about, and the verdict rules: pure Python, no model imported here.

``targets`` finds the phrases a detector is asked for: the noun phrases that differ between
the input and output captions (the same caption diff generate's local blend reads, but kept
as whole phrases, "coffee table", which a detector needs where blend words are single tokens),
else generate's ``blend_words``, else the instruction without its verb. ``decide`` turns the
detector's findings and the measured similarities into one check per rule and a verdict, so
the rules are tested on scenes whose truth is known whatever detector produced the numbers.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from dsbuild.core import generators
from dsbuild.core.text import words
from dsbuild.verify.settings import VerifySettings

ARTICLES = frozenset({"a", "an", "the", "some"})
PRESENCE = frozenset({"a", "an", "no", "without", "with", "some"})  # say whether a thing is there
# words that end a noun phrase ("a sofa [and] a rug", "a lamp [in] the corner")
STOP = frozenset(
    "and or with without in on at by near next beside under above behind to for from that "
    "which is are has have no into onto against between while where".split())
FUNCTION = STOP | ARTICLES | frozenset({"of", "its", "it", "this", "these", "those"})
VERBS = frozenset(
    "add put place include insert remove delete take get rid away off out replace swap turn "
    "change make paint give restyle redecorate use".split())


@dataclass(frozen=True)
class Found:
    """What a detector saw of one phrase in one image: the best box's score, how many distinct
    boxes pass ``present_min`` (after NMS), and the best box in pixels (x0, y0, x1, y1)."""

    score: float
    count: int = 0
    box: tuple[float, float, float, float] | None = None


@dataclass
class Targets:
    """The phrases an edit is about: ``old`` (in the input), ``new`` (in the output) and, for a
    change, the ``thing`` whose look changes; ``source`` says where they came from."""

    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    thing: str | None = None
    source: str = "none"

    def as_dict(self) -> dict:
        return {"old": self.old, "new": self.new, "thing": self.thing, "source": self.source}


def _phrase_after(ws: list[str], j: int) -> list[str]:
    """The noun phrase starting at ``ws[j]`` (articles skipped), up to a stop word or the next
    article."""
    while j < len(ws) and ws[j] in ARTICLES:
        j += 1
    out: list[str] = []
    while j < len(ws) and ws[j] not in STOP and not (out and ws[j] in ARTICLES):
        out.append(ws[j])
        j += 1
    return out


def _span_phrase(ws: list[str], i1: int, i2: int) -> list[str]:
    """The phrase a changed span names: the noun phrase after a changed presence word ("no rug"
    -> "a rug" is about "rug"), else the span's content words continued to the phrase's end."""
    span = ws[i1:i2]
    if any(w in PRESENCE for w in span):
        last = max(k for k in range(i1, i2) if ws[k] in PRESENCE)
        return _phrase_after(ws, last + 1)
    content = [w for w in span if w not in FUNCTION]
    if not content:
        return []
    return [*content, *_phrase_after(ws, i2)] if i2 < len(ws) and ws[i2] not in STOP else content


def caption_diff(src: str, dst: str) -> tuple[list[str], list[str], list[str]]:
    """(phrases only in src, phrases only in dst, the phrase after a changed attribute) from the
    word diff of two captions."""
    a, b = words(src), words(dst)
    old, new, rest = [], [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        p_old = _span_phrase(a, i1, i2) if i2 > i1 else []
        p_new = _span_phrase(b, j1, j2) if j2 > j1 else []
        if p_old:
            old.append(" ".join(p_old))
        if p_new:
            new.append(" ".join(p_new))
        after = _phrase_after(b, j2) if j2 < len(b) and b[j2] not in STOP else []
        if after:
            rest.append(" ".join(after))
    return _unique(old), _unique(new), _unique(rest)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def subject(caption: str) -> str | None:
    """The caption's first noun phrase ("a red velvet armchair ..." -> "red velvet armchair")."""
    np = _phrase_after(words(caption), 0)
    return " ".join(np) or None


def from_instruction(edit: str) -> str | None:
    """The instruction without its leading verbs and article ("remove the rug" -> "rug")."""
    ws = words(edit)
    i = 0
    while i < len(ws) and ws[i] in VERBS:
        i += 1
    np = _phrase_after(ws, i)
    return " ".join(np) or None


def targets(pair: dict, triple: dict) -> Targets:
    """The phrases to detect for one pair (see the module docstring for the order)."""
    op = triple.get("operation")
    old, new, rest = caption_diff(triple.get("input", ""), triple.get("output", ""))
    if op == "change":
        thing = (rest[0] if rest else None) or subject(triple.get("output", ""))
        return Targets(old, new, thing, "captions" if thing else "none")
    if op == "add":
        old = []
    elif op == "remove":
        new = []
    if (op in ("add", "replace") and new) or (op == "remove" and old) or \
            (op == "replace" and old and new):
        return Targets(old, new, None, "captions")
    blend = generators.by_role(pair, "edit_words")  # P2P: its local-blend words
    if blend and len(blend) == 2:
        bo, bn = (" ".join(w for w in side if w not in FUNCTION) for side in blend)
        t = Targets([bo] if bo and op != "add" else [], [bn] if bn and op != "remove" else [],
                    None, "blend_words")
        if t.old or t.new:
            return t
    phrase = from_instruction(triple.get("edit", ""))
    if phrase and op == "add":
        return Targets([], [phrase], None, "instruction")
    if phrase and op == "remove":
        return Targets([phrase], [], None, "instruction")
    return Targets(old, new, None, "none")


# ------------------------------------------------------------------------------ decisions


def _present(f: Found | None, s: VerifySettings) -> bool:
    return f is not None and f.score >= s.present_min


def _absent(f: Found | None, s: VerifySettings) -> bool:
    return f is None or f.score <= s.absent_max


def _box(f: Found | None, s: VerifySettings) -> list[float] | None:
    return list(f.box) if _present(f, s) and f.box else None


def _seen(phrase: str, f_in: Found | None, f_out: Found | None, s: VerifySettings) -> dict:
    """What the detector saw of one phrase: scores, counts and, where it saw the thing, its best
    box in each image (the region the rejects sheet draws)."""
    return {"phrase": phrase,
            "input": None if f_in is None else round(f_in.score, 4),
            "output": None if f_out is None else round(f_out.score, 4),
            "count_input": None if f_in is None else f_in.count,
            "count_output": None if f_out is None else f_out.count,
            "box_input": _box(f_in, s), "box_output": _box(f_out, s)}


def check(name: str, ok: bool | None, reason: str | None = None, **values) -> dict:
    """One check's record: passed (None: could not be checked), why not, what was measured."""
    return {"name": name, "pass": ok, "reason": None if ok else reason, **values}


def operation_check(op: str, t: Targets, det_in: dict[str, Found], det_out: dict[str, Found],
                    s: VerifySettings, change: dict | None = None) -> dict:
    """The detector check of one operation (add, remove, replace, change)."""
    asked = [t.thing] if op == "change" and t.thing else [*t.old, *t.new]
    seen = [_seen(p, det_in.get(p), det_out.get(p), s) for p in dict.fromkeys(asked)]
    if op == "change":
        if not t.thing:
            return check("change", None, "no_target", seen=seen)
        f_in, f_out = det_in.get(t.thing), det_out.get(t.thing)
        if not (_present(f_in, s) or _present(f_out, s)):
            return check("change", False, "change_not_detected", seen=seen)
        c = change or {}
        d, rest = c.get("region_dir"), c.get("rest")
        vals = {"region_dir": d, "rest": rest, "box": c.get("box")}
        if d is not None and d < s.change_dir_min:
            return check("change", False, "change_wrong_direction", seen=seen, **vals)
        if rest is not None and rest < s.rest_min:
            return check("change", False, "change_spilled", seen=seen, **vals)
        return check("change", True, seen=seen, **vals)
    if op == "add":
        if not t.new:
            return check("add", None, "no_target", seen=seen)
        for p in t.new:
            f_in, f_out = det_in.get(p), det_out.get(p)
            if not _present(f_out, s):
                return check("add", False, "add_not_detected", seen=seen)
            more = s.count_gain and f_in is not None and f_out.count > f_in.count
            if not (_absent(f_in, s) or more):
                return check("add", False, "add_already_present", seen=seen)
        return check("add", True, seen=seen)
    if op == "remove":
        if not t.old:
            return check("remove", None, "no_target", seen=seen)
        for p in t.old:
            f_in, f_out = det_in.get(p), det_out.get(p)
            if not _present(f_in, s):
                return check("remove", False, "remove_not_in_input", seen=seen)
            fewer = s.count_gain and f_out is not None and f_out.count < f_in.count
            if not (_absent(f_out, s) or fewer):
                return check("remove", False, "remove_still_there", seen=seen)
        return check("remove", True, seen=seen)
    if op == "replace":
        if not (t.old and t.new):
            return check("replace", None, "no_target", seen=seen)
        if not all(_present(det_in.get(p), s) for p in t.old):
            return check("replace", False, "replace_old_missing", seen=seen)
        if not all(_present(det_out.get(p), s) for p in t.new):
            return check("replace", False, "replace_new_missing", seen=seen)
        return check("replace", True, seen=seen)
    return check(op or "?", None, "unknown_operation", seen=seen)


def near_copy_check(similarity: float | None, s: VerifySettings, exempt: bool) -> dict:
    """The near-copy bound: an edit whose output is (almost) its input is no edit."""
    if similarity is None:
        return check("near_copy", None, "image_error")
    sim = round(similarity, 5)
    if exempt:
        return check("near_copy", True, similarity=sim, exempt=True)
    return check("near_copy", sim <= s.near_copy_max, "near_copy", similarity=sim)


def preserve_check(similarity: float | None, s: VerifySettings) -> dict:
    """A photo pair's preservation: outside its edit mask the edited image stays close to the
    photo (``similarity`` over those pixels; None: the mask leaves no pixel outside)."""
    if similarity is None:
        return check("preserve", None, "mask_covers_all")
    sim = round(similarity, 5)
    return check("preserve", sim >= s.preserve_min, "photo_not_preserved", similarity=sim)


def judge_check(record: dict | None, s: VerifySettings) -> dict:
    """The judge's verdict under its rubric (``record``: a judge record,
    :func:`dsbuild.llm.rubric.judge_record`): ``judge_<criterion>`` below a minimum,
    ``judge_weighted`` under the threshold; a missing score is counted, not a reject."""
    if record is None:
        return check("judge", None, "judge_no_reply")
    if record.get("missing"):
        return check("judge", None, f"judge_bad_reply:{record['missing']}")
    sc = {**record["scores"], "reason": record.get("reason") or ""}
    extra = {"score": record["score"]} if record.get("threshold") else {}
    if record.get("passed") is False:
        return check("judge", False, f"judge_{record['failed']}", scores=sc, **extra)
    return check("judge", True, scores=sc, **extra)


def verdict(checks: list[dict]) -> tuple[str, str | None]:
    """("reject", the first failed check's reason) or ("pass", None); a check that could not be
    made (pass None) never rejects."""
    for c in checks:
        if c["pass"] is False:
            return "reject", c["reason"]
    return "pass", None
