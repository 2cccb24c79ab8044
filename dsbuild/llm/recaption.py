"""Re-captioning: a vision-language model, shown the instruction, the input image and the edited
image, writes the instruction that describes what actually changed (EditCaption's finding: a
generated pair often does less, or something else, than its planned instruction says).

One request per pair through the shared client (:class:`dsbuild.llm.client.ChatClient`:
concurrency, retries, the request cache, usage stats), the images as PNG ``data:`` URLs (the
judge's :func:`dsbuild.llm.judge.data_url`) in the judge's message layout. The reply is one
imperative sentence in the style of the instruction, or exactly ``unchanged``. :func:`parse`
strips code fences, quotes and an ``Instruction:`` label; ``unchanged`` in any case or
punctuation is a re-caption that saw no change; an empty reply, a refusal or text that is no
single instruction is ``missing`` with its reason (counted, never a re-caption). A request that
failed after its retries gives no record, so a re-run asks again (replies already received
come from the cache).
"""

from __future__ import annotations

import re
from pathlib import Path

from dsbuild.core.hashing import content_id
from dsbuild.llm.judge import EDITED, REFUSALS, USER, PairAsker
from dsbuild.llm.settings import LLMSettings

SYSTEM = ("You describe image edits. You get the instruction an edit was made from, the input "
          "image and the edited image. Write the instruction that describes what actually "
          "changed from the input image to the edited image: one imperative sentence in the "
          "style of the given instruction (repeat it when the edited image carries it out "
          "exactly). If nothing changed, answer exactly: unchanged. Answer with the "
          "instruction only, no quotes, no explanation.")
MISSING = ("no_reply", "refused", "not_an_instruction")
MAX_WORDS = 40  # a longer reply is an explanation, not one instruction
QUOTES = "\"'`“”‘’«»"
LABEL = re.compile(r"^(?:edit\s+)?instruction\s*:\s*", re.IGNORECASE)


def prompt_hash() -> str:
    """Names the prompt in re-caption records: the system prompt and the user text template."""
    return content_id("recaption-prompt", SYSTEM, [USER, EDITED])


def parse(reply: dict, instruction: str = "") -> dict:
    """``{"instruction": text}``, ``{"unchanged": True}`` or ``{"bad": reason}`` of a reply.

    A trailing full stop goes when ``instruction`` (the generated one) has none, so the two
    read alike."""
    text = (reply.get("content") or "").strip()
    if reply.get("finish_reason") == "content_filter":
        return {"bad": "refused"}
    if text.startswith("```"):
        text = text.strip("`").strip()
        first, _, rest = text.partition("\n")
        if rest and " " not in first.strip():  # a language tag on the fence line
            text = rest
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    text = " ".join(lines[:1])
    text = LABEL.sub("", text).strip().strip(QUOTES).strip()
    if not text:
        return {"bad": "no_reply"}
    if re.sub(r"[^a-z]", "", text.lower()) == "unchanged":
        return {"unchanged": True}
    if text.lower().startswith(REFUSALS):
        return {"bad": "refused"}
    if len(lines) > 1 or len(text.split()) > MAX_WORDS or text[:1] in "{[":
        return {"bad": "not_an_instruction"}
    if text.endswith(".") and not instruction.rstrip().endswith("."):
        text = text[:-1].rstrip()
    return {"instruction": text}


def same(a: str | None, b: str | None) -> bool:
    """Two instructions alike but for case, spacing and punctuation."""
    def norm(s: str) -> str:
        return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())
    return a is not None and b is not None and norm(a) == norm(b)


class Recaptioner(PairAsker):
    """Asks for the re-caption of many pairs at once (:class:`dsbuild.llm.judge.PairAsker`)."""

    system = SYSTEM
    key = "recaption"

    def __init__(self, settings: LLMSettings, cache_dir: Path, *,
                 section: str = "verify.recaption", offline_hint: str = ""):
        super().__init__(settings, cache_dir, section=section, offline_hint=offline_hint)
        self.prompt_hash = prompt_hash()

    def record(self, reply: dict, instruction: str) -> dict:
        """The re-caption record (:class:`dsbuild.core.schema.Recaption`) of one reply."""
        got = parse(reply, instruction)
        if got.get("bad"):
            self.bad[got["bad"]] += 1
        return {"instruction": got.get("instruction"), "unchanged": bool(got.get("unchanged")),
                "model_requested": self.settings.model, "model_reported": reply.get("model"),
                "prompt_hash": self.prompt_hash, "temperature": self.settings.temperature,
                "raw": reply.get("content"), "missing": got.get("bad")}


def counts(records: list[dict], generated: dict[str, str]) -> dict:
    """What re-captioning did over verify records: ``asked`` (pairs with a re-caption record),
    ``recaptioned`` (with an instruction), ``unchanged``, ``missing``, ``differ`` (a
    re-caption unlike the generated instruction, by pair id in ``generated``)."""
    rcs = [(r["pair_id"], r["recaption"]) for r in records if r.get("recaption")]
    return {"asked": len(rcs),
            "recaptioned": sum(bool(rc.get("instruction")) for _, rc in rcs),
            "unchanged": sum(bool(rc.get("unchanged")) for _, rc in rcs),
            "missing": sum(bool(rc.get("missing")) for _, rc in rcs),
            "differ": sum(bool(rc.get("instruction")) and not same(rc["instruction"],
                                                                    generated.get(pid))
                          for pid, rc in rcs)}
