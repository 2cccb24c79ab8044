"""The agent prompt (system + user messages) and the parser for the JSON lines an LLM returns."""

from __future__ import annotations

import json
import random
import re

from dsbuild.core.config import Agent, Recipe
from dsbuild.core.hashing import content_id

SYSTEM_PROMPT = """\
You write training data for an instruction-based image editing model. Each sample is a JSON \
object with three fields: "input" (a caption of an image before the edit), "edit" (an \
instruction, in the imperative, that changes exactly one feature) and "output" (the caption of \
the image after the edit). Optionally add "operation": one of add, remove, change, replace.

Rules:
1. One feature change per sample: add an object or part, remove one, change one attribute \
(colour, material, style, size, pattern) or replace one object by another. Everything else in \
the output caption stays word for word as in the input caption.
2. Removal: the input caption must name the thing that is removed, and the output caption no \
longer has it (e.g. input "a desk with three drawers", edit "remove the drawers", output "a desk").
3. Addition: the input caption must say that the thing is absent, and the output caption has it \
(e.g. input "a desk without drawers", edit "add drawers", output "a desk with drawers").
4. The edit starts with a verb ("add", "remove", "make", "replace", "paint", ...).
5. Captions are short, concrete and visual (at most 40 words); no people, no text in images.
6. Do not repeat the examples; every sample is different from the others.

Answer with JSON lines only: one JSON object per line, no numbering, no prose, no code fences."""


def _fmt_list(words: list[str], k: int, rng: random.Random) -> str:
    if len(words) <= k:
        return ", ".join(words)
    return ", ".join(rng.sample(words, k))


PHOTO_RULES = (
    "Input caption (of a real photo): {caption}\n"
    "Every sample's \"input\" is this caption, word for word. Remove, replace or change only "
    "things it names; add only things it does not name (here rule 3 does not apply: the input "
    "caption stays as it is)."
)


def build_messages(recipe: Recipe, agent: Agent, n: int, sample: int, seed: int,
                   photo_caption: str | None = None) -> list[dict]:
    """Messages for request ``sample`` of an agent; a per-sample focus keeps requests varied.
    ``photo_caption``: the triples edit this caption of a real photo (given as the input)."""
    rng = random.Random(content_id("prompt", seed, agent.name, sample))
    lines, focus_ops = _context(recipe, agent, rng)
    lines.append(
        f"Batch {sample + 1}. Write {n} new samples as JSON lines. In this batch, favour these "
        "operations: "
        f"{', '.join(focus_ops)}; and this subject: {rng.choice(agent.vocabulary.subjects)}."
    )
    if photo_caption is not None:
        lines.append(PHOTO_RULES.format(caption=json.dumps(photo_caption, ensure_ascii=False)))
    system = recipe.system_prompt or SYSTEM_PROMPT
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def _context(recipe: Recipe, agent: Agent, rng: random.Random, examples: bool = True
             ) -> tuple[list[str], list[str]]:
    """The user message's context lines (agent, vocabulary sample, operations, and the
    few-shot examples unless ``examples`` is false) and the operations this request
    favours."""
    voc = agent.vocabulary
    ops = list(agent.operations)
    focus_ops = rng.sample(ops, min(2, len(ops)))
    lines = [
        f"Context: {agent.context} ({agent.level} level, recipe '{recipe.name}').",
        f"Subjects: {_fmt_list(voc.subjects, 8, rng)}.",
    ]
    for label, words in (("Objects", voc.objects), ("Parts that can be added or removed",
                                                      voc.features),
                         ("Styles", voc.styles), ("Materials", voc.materials),
                         ("Colours", voc.colours), ("Fixtures", voc.fixtures)):
        if words:
            lines.append(f"{label}: {_fmt_list(words, 8, rng)}.")
    lines.append(f"Allowed operations: {', '.join(ops)}.")
    if examples:
        lines.append("Examples:")
        for ex in agent.examples:
            lines.append(json.dumps({"input": ex.input, "edit": ex.edit, "output": ex.output},
                                    ensure_ascii=False))
    return lines, focus_ops


SESSION_RULES = """\
Now write editing sessions instead of single samples: a designer edits one image step by step \
and may go back to try another branch. A session is one JSON object on one line: \
{{"input": <the first caption>, "turns": [{{"edit": ..., "output": ..., "parent": null}}, \
{{"edit": ..., "output": ..., "parent": 0}}, ...]}}. Each turn edits the caption of its parent: \
"parent" is the index (from 0) of an earlier turn in "turns" whose output it edits, or null \
for the session's input caption. Every turn follows the rules above against the caption it \
edits (one feature change; removal: that caption names the thing; addition: that caption says \
it is absent). A path from the input caption has {min_turns} to {turns} turns\
{branching}."""


PHOTO_SESSION_RULES = (
    "Input caption (of a real photo): {caption}\n"
    "Every session's \"input\" is this caption, word for word. Turns that edit it (parent "
    "null) remove, replace or change only things it names and add only things it does not "
    "name (for them rule 3 does not apply); later turns follow every rule against the caption "
    "they edit."
)


def build_session_messages(recipe: Recipe, agent: Agent, n: int, sample: int, seed: int,
                           turns: int, min_turns: int, branches: int, trees: bool,
                           photo_caption: str | None = None) -> list[dict]:
    """Messages for session request ``sample`` of an agent: the agent's context and few-shot
    examples (each shown as a one-turn session), then the session format and its limits.
    ``trees``: some sessions branch (a caption edited in up to ``branches`` ways);
    ``photo_caption``: every session starts from this caption of a real photo."""
    rng = random.Random(content_id("session-prompt", seed, agent.name, sample))
    lines, focus_ops = _context(recipe, agent, rng, examples=False)
    lines.append("Examples of single edits, each written as a one-turn session:")
    for ex in agent.examples:
        lines.append(json.dumps({"input": ex.input, "turns": [
            {"edit": ex.edit, "output": ex.output, "parent": None}]}, ensure_ascii=False))
    ways = "2" if branches == 2 else f"2 to {branches}"
    branching = (f"; in some sessions one caption is edited in {ways} different ways "
                 "(several turns with the same parent)" if trees and branches > 1 else
                 "; every turn edits the output of the turn before it (a chain)")
    lines.append(SESSION_RULES.format(min_turns=min_turns, turns=turns, branching=branching))
    lines.append(
        f"Session batch {sample + 1}. Write {n} new sessions as JSON lines, one session per "
        f"line. In this batch, favour these operations: {', '.join(focus_ops)}; and this "
        f"subject: {rng.choice(agent.vocabulary.subjects)}."
    )
    if photo_caption is not None:
        lines.append(PHOTO_SESSION_RULES.format(
            caption=json.dumps(photo_caption, ensure_ascii=False)))
    system = recipe.system_prompt or SYSTEM_PROMPT
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


NOT_JSON = object()  # stands for a line that is not JSON in parse_lines' result

_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")


def parse_lines(text: str) -> list[object]:
    """Candidates in an LLM reply: one parsed JSON value per line, or ``NOT_JSON`` for junk.

    Blank lines and code fences are skipped; list markers ("1.", "-") are stripped; a reply
    that is one JSON array yields its items.
    """
    text = (text or "").strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            arr = json.loads(text)
            if isinstance(arr, list):
                return list(arr)
        except json.JSONDecodeError:
            pass
    out: list[object] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("```"):
            continue
        line = _LIST_MARKER.sub("", line, count=1) if not line.startswith("{") else line
        line = line.rstrip(",")
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append(NOT_JSON)
    return out
