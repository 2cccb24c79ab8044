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
    lines.append("Examples:")
    for ex in agent.examples:
        lines.append(json.dumps({"input": ex.input, "edit": ex.edit, "output": ex.output},
                                ensure_ascii=False))
    lines.append(
        f"Batch {sample + 1}. Write {n} new samples as JSON lines. In this batch, favour these "
        "operations: "
        f"{', '.join(focus_ops)}; and this subject: {rng.choice(voc.subjects)}."
    )
    if photo_caption is not None:
        lines.append(PHOTO_RULES.format(caption=json.dumps(photo_caption, ensure_ascii=False)))
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
