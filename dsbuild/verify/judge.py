"""The optional vision-language judge: a rubric in VIEScore's spirit, asked through the shared
OpenAI-compatible client (``dsbuild.llm.client.ChatClient``: concurrency, tenacity retries, the request
cache in ``cache/verify-judge``, usage stats).

Each pair is one request: the instruction and both images as ``data:`` URLs (PNG, longest side
``verify.judge.image_side``). The model answers JSON ``{"instruction": 0-10, "preserve": 0-10,
"quality": 0-10, "reason": "..."}``; the reply is parsed and validated with a pydantic model,
and a bad one (not JSON, a field missing or out of range, a refusal) is counted with its
reason and never rejects a pair. A request that failed after its retries gives no record, so
a re-run asks again (replies already received come from the cache).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections import Counter
from contextlib import aclosing
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from dsbuild.llm.client import ChatClient, RequestCache
from dsbuild.verify.settings import JudgeSettings

SYSTEM = (
    "You check image edits. You get an editing instruction, the input image and the edited "
    "image. Score each from 0 to 10: instruction = how fully the edited image carries out the "
    "instruction; preserve = how well everything the instruction does not mention stayed the "
    "same (10: nothing else changed); quality = how natural and free of artefacts the edited "
    'image is. Answer with JSON only: {"instruction": <int>, "preserve": <int>, '
    '"quality": <int>, "reason": "<one short sentence>"}'
)
REFUSALS = ("i can't", "i cannot", "i'm sorry", "i am sorry", "i won't", "unable to help")


class Rubric(BaseModel):
    """A validated judge reply."""

    instruction: int = Field(ge=0, le=10)
    preserve: int = Field(ge=0, le=10)
    quality: int = Field(ge=0, le=10)
    reason: str = ""


def data_url(path: str | Path, side: int) -> str:
    """A PNG ``data:`` URL of an image, its longest side at most ``side`` pixels."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(instruction: str, input_url: str, output_url: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [
        {"type": "text", "text": f"Instruction: {instruction}\nInput image:"},
        {"type": "image_url", "image_url": {"url": input_url}},
        {"type": "text", "text": "Edited image:"},
        {"type": "image_url", "image_url": {"url": output_url}},
    ]}]


def parse(reply: dict) -> dict:
    """``{"scores": {...}}`` for a valid reply, else ``{"bad": reason}``."""
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
        r = Rubric.model_validate(data)
    except ValidationError as exc:
        kinds = {e["type"] for e in exc.errors()}
        return {"bad": "missing_field" if "missing" in kinds else "out_of_range"}
    return {"scores": r.model_dump()}


class Judge:
    """Asks the judge about many pairs at once; results in the order asked."""

    def __init__(self, settings: JudgeSettings, cache_dir: Path):
        self.settings = settings
        self.client = ChatClient(settings, RequestCache(cache_dir), section="verify.judge",
                                 offline_hint="or set verify.judge.enabled=false")
        self.bad: Counter = Counter()

    def ask(self, items: list[tuple[str, str, Path, Path]]) -> dict[str, dict | None]:
        """(pair id, instruction, input image, output image) -> parsed result, or None where
        the request failed after its retries."""
        return asyncio.run(self._ask(items))

    async def _ask(self, items) -> dict[str, dict | None]:
        side = self.settings.image_side
        reqs = [(messages(instr, data_url(a, side), data_url(b, side)), f"verify:{pid}")
                for pid, instr, a, b in items]
        out: dict[str, dict | None] = {}
        async with self.client:
            replies = self.client.complete_in_order(reqs)
            async with aclosing(replies):
                i = 0
                async for reply in replies:
                    pid = items[i][0]
                    out[pid] = None if reply is None else parse(reply)
                    if out[pid] and out[pid].get("bad"):
                        self.bad[out[pid]["bad"]] += 1
                    i += 1
        return out

    def stats(self) -> dict:
        return {**self.client.stats.as_dict(), "bad_replies": dict(sorted(self.bad.items()))}
