"""Validate caption triples: fields, instruction form, a local word-level diff, the add/remove
rules and duplicates. A bad triple gets a reason (counted in reports/captions.json), never
an exception; only the recipe's own few-shot examples raise (a recipe error).
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field

from dsbuild.captions.grounding import REASONS as GROUNDING_REASONS
from dsbuild.core.config import OPERATIONS, Agent, Recipe
from dsbuild.core.errors import ConfigError
from dsbuild.core.text import normalise, singular, words

FIELDS = ("input", "edit", "output")

# Reasons a triple is rejected (keys of reports/captions.json "rejected").
REASONS = {
    "not_json": "the line is not JSON",
    "not_object": "the line is JSON but not an object",
    "missing_field": "input, edit or output is missing, empty or not a string",
    "too_long": "a caption has more than max words (CLIP reads 77 tokens)",
    "no_change": "the output says the same as the input",
    "edit_not_instruction": "the edit does not start with an instruction verb",
    "edit_is_caption": "the edit repeats a caption instead of instructing",
    "operation_not_allowed": "the operation is not one of the agent's operations",
    "operation_mismatch": "the stated operation contradicts the edit's verb",
    "diff_too_large": "too large a share of the output differs from the input",
    "diff_too_scattered": "the output changes the input in too many separate places",
    "diff_unrelated_to_edit": "the output changes words the edit does not talk about",
    "remove_not_in_input": "removal: the input caption does not name the removed thing",
    "remove_still_in_output": "removal: the output caption still has the removed thing",
    "add_not_absent_in_input": "addition: the input caption does not say the thing is absent",
    "add_not_in_output": "addition: the output caption does not have the added thing",
    "copies_example": "the triple copies one of the recipe's few-shot examples",
    "duplicate": "an exact duplicate (normalised text) of a kept triple",
    "near_duplicate": "the same input→output change (content words) as a kept triple",
}
REASONS.update(GROUNDING_REASONS)
# a session line (dsbuild/captions/sessions.py); its turns are checked by the rules above
SESSION_REASONS = {
    "session_no_turns": "session: \"turns\" is missing, empty or not a list",
    "session_bad_parent": "session: a turn's \"parent\" is neither null nor the index of an "
                          "earlier turn",
    "session_input_mismatch": "session: a turn's \"input\" is not its parent's output",
    "session_too_deep": "session: a turn deeper than captions.sessions.turns",
    "session_too_many_branches": "session: more edits of one caption than "
                                 "captions.sessions.branches",
}
REASONS.update(SESSION_REASONS)

STOPWORDS = frozenset(
    "a an the and or with of in on at to for by from its it their his her this that these those "
    "some is are be has have having there here into onto as while which who whose s".split()
)
NEGATIONS = frozenset({"no", "without", "not", "lacking", "missing", "minus", "none", "free"})

ADD_VERBS = frozenset({"add", "put", "place", "hang", "install", "include", "insert", "bring",
                       "mount", "fit", "attach", "set", "lay", "drape", "scatter", "lean", "prop",
                       "stack", "equip"})
REMOVE_VERBS = frozenset({"remove", "take", "delete", "erase", "eliminate", "drop", "strip",
                          "clear", "get", "lose", "ditch", "discard", "omit"})
REPLACE_VERBS = frozenset({"replace", "swap", "exchange", "substitute", "switch", "trade"})
CHANGE_VERBS = frozenset({
    "make", "change", "turn", "paint", "colour", "color", "recolour", "recolor", "dye", "stain",
    "upholster", "reupholster", "cover", "give", "use", "convert", "transform", "redo", "restyle",
    "update", "move", "lower", "raise", "widen", "narrow", "shorten", "lengthen", "open", "close",
    "light", "dim", "brighten", "darken", "fill", "empty", "decorate", "refinish", "redecorate",
    "tile", "carpet", "panel", "wallpaper", "render", "style", "have", "let", "show", "enlarge",
    "shrink", "extend", "flip", "rotate", "wrap", "polish", "varnish", "whitewash", "texture",
    "pattern", "age", "modernise", "modernize", "soften", "warm", "cool", "retile",
    "reface", "fold", "unfold", "roll", "pull", "draw", "tidy", "declutter", "arrange", "rearrange",
    # re- verbs and others LLMs write often ("repaint the walls sage green")
    "repaint", "re-paint", "re-upholster", "recover", "re-cover", "restain", "re-stain",
    "resurface", "reposition", "relocate", "shift", "upgrade", "renovate", "remodel", "refresh",
    "lighten", "apply", "frame", "line", "lacquer", "gild", "sand", "bleach", "stencil",
    "increase", "reduce", "thicken",
})
VERBS = ADD_VERBS | REMOVE_VERBS | REPLACE_VERBS | CHANGE_VERBS
PARTICLES = frozenset({"away", "out", "off", "rid", "of", "down", "up", "all"})
TARGET_STOP = frozenset({"from", "in", "on", "to", "at", "next", "beside", "near", "under",
                         "above", "below", "behind", "by", "off", "away", "out", "for", "into",
                         "onto", "so", "and", "leaving", "keeping", "but", "while", "that"})
DETERMINERS = frozenset({"the", "a", "an", "some", "its", "their", "all", "any", "both", "one",
                         "two", "three", "few", "several", "this", "that", "these", "those"})

def clean_text(text: str) -> str:
    """The stored form of a caption: whitespace collapsed, no wrapping quotes, no end period."""
    text = " ".join(str(text).split()).strip().strip('"').strip()
    return text[:-1].rstrip() if text.endswith(".") else text


@dataclass
class Checked:
    """The result of validating one candidate: a triple (when kept) or a reason."""

    triple: dict | None
    reason: str | None = None
    operation: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class Validator:
    """Validates triples for one build rank; remembers kept triples to reject duplicates."""

    max_changed_fraction: float = 0.6
    max_diff_spans: int = 2
    max_words: int = 50
    max_edit_words: int = 30
    seen_exact: set[str] = field(default_factory=set)
    seen_near: set[tuple] = field(default_factory=set)
    examples_exact: set[str] = field(default_factory=set)
    examples_near: set[tuple] = field(default_factory=set)
    rejected: Counter = field(default_factory=Counter)
    _canon_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings) -> Validator:
        return cls(max_changed_fraction=settings.max_changed_fraction,
                   max_diff_spans=settings.max_diff_spans)

    # ------------------------------------------------------------------ helpers
    def _canon(self, agent: Agent | None) -> list[tuple[list[str], list[str]]]:
        """Synonym phrases (as tokens) and the head phrase each stands for, longest first."""
        pairs: list[tuple[list[str], list[str]]] = []
        if agent is None:
            return pairs
        if agent.name in self._canon_cache:
            return self._canon_cache[agent.name]
        for head, syns in agent.vocabulary.synonyms.items():
            h = words(head)
            for syn in syns:
                t = words(syn)
                if t and h and t != h:
                    pairs.append((t, h))
        pairs.sort(key=lambda p: -len(p[0]))
        self._canon_cache[agent.name] = pairs
        return pairs

    @staticmethod
    def _stems(tokens: list[str], canon: list[tuple[list[str], list[str]]]) -> list[str]:
        """Singulars of the tokens with synonym phrases replaced by their head phrase."""
        stems = [singular(w) for w in tokens]
        for syn, head in canon:
            syn_s, head_s = [singular(w) for w in syn], [singular(w) for w in head]
            i, n, out = 0, len(syn_s), []
            while i < len(stems):
                if stems[i:i + n] == syn_s:
                    out.extend(head_s)
                    i += n
                else:
                    out.append(stems[i])
                    i += 1
            stems = out
        return stems

    def _keys(self, inp: str, edit: str, out: str, canon: list) -> tuple[str, tuple]:
        exact = "\x1f".join(normalise(t) for t in (inp, edit, out))
        bag = [tuple(sorted(s for s in self._stems(words(t), canon) if s not in STOPWORDS))
               for t in (inp, out)]
        return exact, tuple(bag)

    def remember(self, triple: dict, agent: Agent | None = None) -> None:
        """Count a triple kept earlier (a resumed shard) as seen, for duplicate checks."""
        exact, near = self._keys(triple["input"], triple["edit"], triple["output"],
                                 self._canon(agent))
        self.seen_exact.add(exact)
        self.seen_near.add(near)

    def remember_examples(self, agent: Agent) -> None:
        """Few-shot examples count as seen: an LLM that copies one is rejected."""
        canon = self._canon(agent)
        for ex in agent.examples:
            exact, near = self._keys(ex.input, ex.edit, ex.output, canon)
            self.examples_exact.add(exact)
            self.examples_near.add(near)

    # ------------------------------------------------------------------ rules
    def check(self, cand: object, agent: Agent | None = None, grounded: bool = False
              ) -> Checked:
        """Validate one candidate triple (a parsed JSON object); count the reason if rejected.
        ``grounded``: its input is a photo's caption, which never says what is absent, so the
        addition rule's "input says it is absent" is left to the detector on the photo."""
        res = self._check(cand, agent, grounded)
        if res.reason:
            self.rejected[res.reason] += 1
        return res

    def reject(self, reason: str) -> Checked:
        """Count a rejection decided outside ``check`` (e.g. a line that is not JSON)."""
        self.rejected[reason] += 1
        return Checked(None, reason)

    def _check(self, cand: object, agent: Agent | None, grounded: bool = False) -> Checked:
        if not isinstance(cand, dict):
            return Checked(None, "not_object")
        vals = {}
        for f in FIELDS:
            v = cand.get(f)
            if not isinstance(v, str) or not clean_text(v):
                return Checked(None, "missing_field")
            vals[f] = clean_text(v)
        inp, edit, out = vals["input"], vals["edit"], vals["output"]
        t_in, t_edit, t_out = words(inp), words(edit), words(out)
        if not t_in or not t_edit or not t_out:
            return Checked(None, "missing_field")
        if max(len(t_in), len(t_out)) > self.max_words or len(t_edit) > self.max_edit_words:
            return Checked(None, "too_long")
        n_in, n_out = normalise(inp), normalise(out)
        if n_in == n_out:
            return Checked(None, "no_change")
        if normalise(edit) in (n_in, n_out):
            return Checked(None, "edit_is_caption")
        verb_i = 1 if t_edit[0] == "please" and len(t_edit) > 1 else 0
        verb = t_edit[verb_i]
        if verb not in VERBS or edit.rstrip().endswith("?"):
            return Checked(None, "edit_not_instruction")
        inferred = infer_operation(t_edit[verb_i:])
        stated = cand.get("operation")
        stated = stated.strip().lower() if isinstance(stated, str) else None
        if stated not in OPERATIONS:
            stated = None
        ops = {o for o in (stated, inferred) if o}
        if {"add", "remove"} <= ops:
            return Checked(None, "operation_mismatch")
        op = stated or inferred
        if agent is not None and op not in agent.operations:
            return Checked(None, "operation_not_allowed")

        canon = self._canon(agent)
        s_in, s_edit, s_out = (self._stems(t, canon) for t in (t_in, t_edit, t_out))
        reason = self._diff(s_in, s_out, set(s_edit) - STOPWORDS)
        if reason:
            return Checked(None, reason, op)
        target = target_stems(s_edit[verb_i:])
        if "remove" in ops and target:
            reason = self._remove_rule(target, s_in, s_out)
        elif "add" in ops and target and not grounded:
            reason = self._add_rule(target, s_in, s_out)
        if reason:
            return Checked(None, reason, op)

        exact, near = self._keys(inp, edit, out, canon)
        if exact in self.examples_exact or near in self.examples_near:
            return Checked(None, "copies_example", op)
        if exact in self.seen_exact:
            return Checked(None, "duplicate", op)
        if near in self.seen_near:
            return Checked(None, "near_duplicate", op)
        self.seen_exact.add(exact)
        self.seen_near.add(near)
        return Checked({"operation": op, "input": inp, "edit": edit, "output": out}, None, op)

    def _diff(self, s_in: list[str], s_out: list[str], edit_words: set[str]) -> str | None:
        """Word-level diff: small, in few places, and each content change near an edit word."""
        sm = difflib.SequenceMatcher(a=s_in, b=s_out, autojunk=False)
        changed, spans = 0, 0
        for tag, i1, i2, j1, j2 in sm.get_opcodes():
            if tag == "equal":
                continue
            changed += max(i2 - i1, j2 - j1)
            words = set(s_in[i1:i2]) | set(s_out[j1:j2])
            if not words - STOPWORDS:
                continue  # only function words moved ("a sofa, a rug" -> "a sofa and a rug")
            spans += 1
            near = set(s_in[max(0, i1 - 2):i2 + 2]) | set(s_out[max(0, j1 - 2):j2 + 2])
            if not (near - STOPWORDS) & edit_words:
                return "diff_unrelated_to_edit"
        if spans == 0:
            return "no_change"
        if changed / max(len(s_in), len(s_out)) > self.max_changed_fraction:
            return "diff_too_large"
        if spans > self.max_diff_spans:
            return "diff_too_scattered"
        return None

    @staticmethod
    def _negated_at(words: list[str], i: int) -> bool:
        """Whether a negation ('no', 'without') governs the word at ``i`` (same list item)."""
        for w in reversed(words[max(0, i - 4):i]):
            if w in NEGATIONS:
                return True
            if w in ("and", "with", "but", "has", "have"):
                return False
        return False

    @staticmethod
    def _find(target: list[str], words: list[str]) -> tuple[list[int], list[str]]:
        """Positions of the longest suffix of ``target`` that occurs in ``words``, and it."""
        for k in range(len(target)):
            part = target[k:]
            hits = _positions(part, words)
            if hits:
                return hits, part
        return [], target

    def _remove_rule(self, target: list[str], s_in: list[str], s_out: list[str]) -> str | None:
        hits, part = self._find(target, s_in)
        pos_in = [i for i in hits if not self._negated_at(s_in, i)]
        if not pos_in:
            return "remove_not_in_input"
        pos_out = [i for i in _positions(part, s_out) if not self._negated_at(s_out, i)]
        if len(pos_out) >= len(pos_in):
            return "remove_still_in_output"
        return None

    def _add_rule(self, target: list[str], s_in: list[str], s_out: list[str]) -> str | None:
        pos_in, part = self._find(target, s_in)
        if not pos_in or any(not self._negated_at(s_in, i) for i in pos_in):
            return "add_not_absent_in_input"
        if not any(not self._negated_at(s_out, i) for i in _positions(part, s_out)):
            return "add_not_in_output"
        return None


def _positions(part: list[str], words: list[str]) -> list[int]:
    n = len(part)
    return [i for i in range(len(words) - n + 1) if words[i:i + n] == part]


def infer_operation(edit_tokens: list[str]) -> str:
    """add/remove/replace/change from the instruction's verb (and a few phrasal forms)."""
    verb = edit_tokens[0]
    rest = edit_tokens[1:4]
    if verb in REPLACE_VERBS:
        return "replace"
    if verb == "get":
        return "remove" if "rid" in rest else "change"
    if verb == "take":
        return "remove" if {"away", "out", "off", "down"} & set(edit_tokens) else "change"
    if verb in ("set", "fit"):
        return "add" if edit_tokens[1:2] in (["a"], ["an"]) else "change"
    if verb in REMOVE_VERBS:
        return "remove"
    if verb in ADD_VERBS:
        return "add"
    if verb in ("turn", "convert", "transform") and "into" in edit_tokens:
        return "replace"
    return "change"


def target_stems(edit_stems: list[str]) -> list[str]:
    """Content words of what an add/remove edit names ('remove the oak shelf from...' -> oak shelf).

    For 'give the chair a cushion' the thing is the last noun phrase, so no determiner ends it.
    """
    give = edit_stems[0] == "give"
    out: list[str] = []
    for w in edit_stems[1:]:
        if (w in PARTICLES or w in DETERMINERS) and not out:
            continue
        if w in TARGET_STOP and out:
            break
        if w in DETERMINERS or w in STOPWORDS:
            if out and not give:
                break
            continue
        out.append(w)
    return out


def check_examples(recipe: Recipe, path: str | None = None,
                   max_changed_fraction: float = 0.6, max_diff_spans: int = 2) -> None:
    """Validate every few-shot example of a recipe; a bad one is a ConfigError naming its agent."""
    problems: list[tuple[str, str]] = []
    for ai, agent in enumerate(recipe.agents):
        v = Validator(max_changed_fraction=max_changed_fraction, max_diff_spans=max_diff_spans)
        for ei, ex in enumerate(agent.examples):
            res = v.check(ex.model_dump(), agent)
            if res.reason:
                problems.append((
                    f"agents[{ai}] ({agent.name}).examples[{ei}]",
                    f"few-shot example breaks the rule '{res.reason}' ({REASONS[res.reason]}): "
                    f"{ex.input!r} / {ex.edit!r} / {ex.output!r}",
                ))
    if problems:
        raise ConfigError(path or f"recipe '{recipe.name}'", problems)


def check_config(config) -> None:
    """`dsbuild init` check: the recipe's few-shot examples pass the captions validator."""
    s = config.captions
    check_examples(config.recipe, config.recipe_path, s.max_changed_fraction, s.max_diff_spans)
