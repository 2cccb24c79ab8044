"""The vision-language judge: a rubric (:mod:`dsbuild.llm.rubric`) in VIEScore's spirit, asked
through the shared OpenAI-compatible client (``dsbuild.llm.client.ChatClient``: concurrency,
tenacity retries, the request cache, usage stats). Verify's judge and eval's suites use it.

Each pair is one request: the instruction and both images as ``data:`` URLs (PNG, longest side
``image_side``). The system prompt lists the rubric's criteria (``name = description``); the
model answers JSON with one 0-10 integer per criterion and ``"reason"``. The reply is parsed
and validated with a pydantic model built from the rubric, and becomes a judge record
(:func:`dsbuild.llm.rubric.judge_record`): who was asked and who answered, the rubric and
prompt hashes, the raw reply, the scores, the weighted score and the verdict. A reply that
cannot be used (not JSON, a criterion missing or out of range, a refusal) is a record with
``missing`` = its reason: counted, never a 0, never a reject. A request that failed after its
retries gives no record, so a re-run asks again (replies already received come from the cache).

For the default ``dsbuild`` rubric the system prompt is, word for word, the one this judge sent
before rubrics existed, so cached replies still answer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections import Counter
from contextlib import aclosing
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

from dsbuild.core.hashing import content_id
from dsbuild.llm.client import ChatClient, RequestCache
from dsbuild.llm.rubric import Rubric, judge_record
from dsbuild.llm.settings import LLMSettings

INTRO = ("You check image edits. You get an editing instruction, the input image and the edited "
         "image. Score each from {lo} to {hi}: ")
INTRO_OUTPUT = "You check images. You get one image. Score each from {lo} to {hi}: "
USER = "Instruction: {instruction}\nInput image:"
EDITED = "Edited image:"
IMAGE = "Image:"
REFUSALS = ("i can't", "i cannot", "i'm sorry", "i am sorry", "i won't", "unable to help")
MISSING = ("no_reply", "not_json", "refused", "missing_field", "out_of_range")


SHOWS = ("pair", "output")  # what a request shows: instruction and both images, or the edit alone


def system_prompt(rubric: Rubric, shows: str = "pair") -> str:
    """The system prompt of a rubric: each criterion ``name = description``, then the JSON the
    reply must be (one ``<int>`` per criterion and a ``reason``). ``shows="output"``: the judge
    sees the edited image alone (VIEScore's perceptual-quality question)."""
    lo, hi = rubric.scale
    intro = (INTRO if shows == "pair" else INTRO_OUTPUT).format(lo=lo, hi=hi)
    items = "; ".join(f"{c.name} = {c.description}" for c in rubric.criteria)
    fields = ", ".join(f'"{n}": <int>' for n in rubric.names)
    return (f"{intro}{items}. Answer with JSON only: {{{fields}, "
            '"reason": "<one short sentence>"}')


def prompt_hash(rubric: Rubric, shows: str = "pair") -> str:
    """Names the prompt in judge records: the system prompt and the user text template (no
    images)."""
    return content_id("judge-prompt", system_prompt(rubric, shows),
                      [USER, EDITED] if shows == "pair" else [IMAGE])


def reply_model(rubric: Rubric) -> type[BaseModel]:
    """The pydantic model of a valid reply: an integer on the rubric's scale per criterion,
    ``reason`` text."""
    lo, hi = rubric.scale
    notes = {n: Annotated[int, Field(ge=lo, le=hi)] for n in rubric.names} | {"reason": str}
    return type("JudgeReply", (BaseModel,), {"__annotations__": notes, "reason": ""})


def data_url(path: str | Path, side: int) -> str:
    """A PNG ``data:`` URL of an image, its longest side at most ``side`` pixels."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(system: str, instruction: str, input_url: str | None, output_url: str) -> list[dict]:
    """One request: the instruction and both images, or (``input_url`` None) the image alone."""
    if input_url is None:
        return [{"role": "system", "content": system}, {"role": "user", "content": [
            {"type": "text", "text": IMAGE},
            {"type": "image_url", "image_url": {"url": output_url}},
        ]}]
    return [{"role": "system", "content": system}, {"role": "user", "content": [
        {"type": "text", "text": USER.format(instruction=instruction)},
        {"type": "image_url", "image_url": {"url": input_url}},
        {"type": "text", "text": EDITED},
        {"type": "image_url", "image_url": {"url": output_url}},
    ]}]


def parse(reply: dict, model: type[BaseModel]) -> dict:
    """``{"scores": {...}, "reason": str}`` for a valid reply, else ``{"bad": reason}``."""
    text = (reply.get("content") or "").strip()
    if reply.get("finish_reason") == "content_filter" or not text:
        return {"bad": "refused"}
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        return {"bad": "refused" if low.startswith(REFUSALS) else "not_json"}
    if not isinstance(data, dict):
        return {"bad": "not_json"}
    if data.get("refusal"):
        return {"bad": "refused"}
    try:
        r = model.model_validate(data)
    except ValidationError as exc:
        kinds = {e["type"] for e in exc.errors()}
        return {"bad": "missing_field" if "missing" in kinds else "out_of_range"}
    got = r.model_dump()
    return {"scores": {k: v for k, v in got.items() if k != "reason"}, "reason": got["reason"]}


class PairAsker:
    """Asks a vision-language model about many image pairs at once (one request per pair: the
    instruction and both images); records in the order asked. Subclasses set ``system`` and
    ``key`` (the cache's sample prefix) and turn a reply into a record (``record``).

    ``settings``: an endpoint (:class:`dsbuild.llm.settings.LLMSettings`) with ``image_side``;
    ``section`` names it in error messages."""

    system: str = ""
    key: str = ""

    def __init__(self, settings: LLMSettings, cache_dir: Path, *, section: str,
                 offline_hint: str = ""):
        self.settings = settings
        self.client = ChatClient(settings, RequestCache(cache_dir), section=section,
                                 offline_hint=offline_hint or f"or set {section}.enabled=false")
        self.bad: Counter = Counter()

    def record(self, reply: dict, instruction: str) -> dict:
        raise NotImplementedError

    def ask(self, items: list[tuple[str, str, Path | None, Path]]) -> dict[str, dict | None]:
        """(pair id, instruction, input image, output image) -> record, or None where the
        request failed after its retries. An input image of None shows the output alone."""
        return asyncio.run(self._ask(items))

    async def _ask(self, items) -> dict[str, dict | None]:
        side = self.settings.image_side
        reqs = [(messages(self.system, instr, None if a is None else data_url(a, side),
                          data_url(b, side)),
                 f"{self.key}:{pid}") for pid, instr, a, b in items]
        out: dict[str, dict | None] = {}
        async with self.client:
            replies = self.client.complete_in_order(reqs)
            async with aclosing(replies):
                i = 0
                async for reply in replies:
                    pid, instr = items[i][0], items[i][1]
                    out[pid] = None if reply is None else self.record(reply, instr)
                    i += 1
        return out

    def stats(self) -> dict:
        return {**self.client.stats.as_dict(), "bad_replies": dict(sorted(self.bad.items()))}


class Judge(PairAsker):
    """Asks the judge about many pairs at once under one rubric (:class:`PairAsker`); ``key``
    prefixes its cache entries (verify's judge: ``verify``), ``shows`` what each request shows
    (``pair`` or ``output``: the edited image alone, no instruction)."""

    def __init__(self, settings: LLMSettings, cache_dir: Path, rubric: Rubric, *,
                 section: str = "verify.judge", offline_hint: str = "", key: str = "verify",
                 shows: str = "pair"):
        if shows not in SHOWS:
            raise ValueError(f"shows must be one of {SHOWS} (got {shows!r})")
        super().__init__(settings, cache_dir, section=section, offline_hint=offline_hint)
        self.key = key
        self.rubric = rubric
        self.shows = shows
        self.system = system_prompt(rubric, shows)
        self.prompt_hash = prompt_hash(rubric, shows)
        self.model = reply_model(rubric)

    def record(self, reply: dict, instruction: str = "") -> dict:
        """The judge record of one reply."""
        got = parse(reply, self.model)
        if got.get("bad"):
            self.bad[got["bad"]] += 1
        return judge_record(self.rubric, model_requested=self.settings.model,
                            model_reported=reply.get("model"), prompt_hash=self.prompt_hash,
                            temperature=self.settings.temperature, raw=reply.get("content"),
                            scores=got.get("scores"), reason=got.get("reason"),
                            missing=got.get("bad"))
