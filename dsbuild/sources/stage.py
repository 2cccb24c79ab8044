"""The sources stage: every configured photo is read, given its content id (the hash of its
file's bytes), checked (exact and near duplicates, size, license), prepared at the generation
size as ``photos/img/<id>.png`` (atomic) and written as a :class:`dsbuild.core.schema.Photo`
record with its caption and provenance. Photos without a caption are captioned by a VLM
through the shared OpenAI-compatible client (cached, resumable), or, without an endpoint,
stop the stage naming the file. Refused photos are counted per reason and named in the
report (reports/sources.json). Not sharded: near-duplicates are found across all photos."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from dsbuild.core.build import Build, StageResult
from dsbuild.core.errors import DsbuildError
from dsbuild.core.progress import progress
from dsbuild.core.records import ShardWriter, write_image
from dsbuild.sources import phash as ph
from dsbuild.sources.inputs import SIDECAR, Candidate, candidates
from dsbuild.sources.settings import SourcesSettings

IMG_DIR = "img"
REASONS = ("duplicate", "unreadable", "small", "near_duplicate", "unknown_license", "caption")
MIN_CAPTION_WORDS = 3


@dataclass
class Kept:
    cand: Candidate
    id: str
    width: int
    height: int
    phash: str
    license: str | None


def photo_id(data: bytes) -> str:
    """A photo's content id: the hash of its file's bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """The photo at width x height by the crop/resize policy (``sources.fit``); a photo
    already at that size is returned as it is (pixel-equal)."""
    w, h = image.size
    if (w, h) == (width, height):
        return image
    lanczos = Image.Resampling.LANCZOS
    if mode == "resize":
        return image.resize((width, height), lanczos)
    if mode == "center-crop":
        return ImageOps.fit(image, (width, height), lanczos, centering=(0.5, 0.5))
    if mode == "pad":
        scale = min(width / w, height / h)
        inner = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), lanczos)
        out = Image.new("RGB", (width, height))
        out.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
        return out
    raise DsbuildError(f"sources.fit: unknown policy {mode!r} (center-crop, resize, pad)")


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return ImageOps.exif_transpose(im).convert("RGB")


class SourcesRun:
    def __init__(self, build: Build, writer: ShardWriter, settings: SourcesSettings):
        self.build, self.writer, self.s = build, writer, settings
        gen = build.config.stage_settings("generate")
        self.width, self.height = gen.width, gen.height
        self.refused: dict[str, list[dict]] = {r: [] for r in REASONS}
        self.img_dir = build.output_dir("sources") / IMG_DIR
        self.requests: dict | None = None

    def refuse(self, reason: str, cand: Candidate, **why) -> None:
        self.refused[reason].append({"file": cand.path, **why})

    # ------------------------------------------------------------------ checks
    def select(self, cands: list[Candidate], bar) -> list[Kept]:
        """The photos that pass, in input order; each refusal noted with its reason. Kept
        photos are prepared (their PNG written) here, unless already written as records."""
        s, seen, kept = self.s, {}, []
        for cand in cands:
            bar.update(1)
            try:
                data = cand.read()
            except OSError as exc:
                self.refuse("unreadable", cand, error=str(exc))
                continue
            pid = photo_id(data)
            if pid in seen:
                self.refuse("duplicate", cand, of=seen[pid])
                continue
            seen[pid] = cand.path
            try:
                image = _open(data)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                self.refuse("unreadable", cand, error=f"{type(exc).__name__}: {exc}")
                continue
            w, h = image.size
            if w < self.width or h < self.height:
                msg = (f"{cand.path}: {w}x{h} is smaller than the generation size "
                       f"{self.width}x{self.height} (generate.width x generate.height)")
                if s.small == "error":
                    raise DsbuildError(f"{msg}; remove it, use a larger photo, or set "
                                       "sources.small=skip to skip such photos")
                self.refuse("small", cand, size=[w, h])
                continue
            hsh = ph.phash(image)
            if s.phash_distance >= 0:
                near = min(((ph.distance(hsh, k.phash), k) for k in kept),
                           key=lambda t: t[0], default=None)
                if near is not None and near[0] <= s.phash_distance:
                    self.refuse("near_duplicate", cand, of=near[1].cand.path, distance=near[0])
                    continue
            lic = cand.license or s.license
            if lic is None and s.require_license:
                self.refuse("unknown_license", cand, where=cand.where)
                continue
            k = Kept(cand, pid, w, h, hsh, lic)
            if pid not in self.writer.done:
                write_image(self.prepared(pid), fit(image, self.width, self.height, s.fit))
            kept.append(k)
        return kept

    def prepared(self, pid: str) -> Path:
        return self.img_dir / f"{pid}.png"

    def record(self, k: Kept, caption: str, caption_source: str) -> dict:
        return {"id": k.id, "path": k.cand.path,
                "image": self.prepared(k.id).relative_to(self.build.root).as_posix(),
                "width": k.width, "height": k.height, "caption": caption,
                "caption_source": caption_source, "license": k.license,
                "source": k.cand.source, "attribution": k.cand.attribution, "phash": k.phash}

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        started = time.perf_counter()
        cands = candidates(self.s)
        with progress(total=len(cands), desc="sources", unit="photo") as bar:
            kept = self.select(cands, bar)
        todo = [k for k in kept if k.id not in self.writer.done]
        missing = [k for k in todo if not k.cand.caption]
        if missing and not self.s.captions_with_vlm:
            named = "; ".join(f"{k.cand.path} ({k.cand.where})" for k in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            hint = (f"add its caption to {SIDECAR} in the photo folder" if self.s.origin == "path"
                    else "set sources.caption_column to the captions")
            raise DsbuildError(
                f"sources: {len(missing)} photo(s) have no caption: {named}{more}; {hint}, or "
                "caption them with a VLM (sources.base_url=URL of an OpenAI-compatible "
                "endpoint, or sources.vlm=true)")
        for k in todo:
            if k.cand.caption:
                self.writer.write(self.record(k, k.cand.caption, k.cand.caption_source))
        if missing:
            self.caption_with_vlm(missing)
        return self.stats(started)

    def caption_with_vlm(self, missing: list[Kept]) -> None:
        from dsbuild.llm.client import ChatClient, RequestCache, check_endpoint

        check_endpoint(self.s, "sources")
        client = ChatClient(self.s, RequestCache(self.build.cache_dir / "sources"),
                            section="sources")

        async def ask() -> None:
            asks = [(self.messages(k), k.id) for k in missing]
            async with client:
                with progress(total=len(asks), desc="sources captions", unit="photo") as bar:
                    i = 0
                    async for reply in client.complete_in_order(asks):
                        k = missing[i]
                        i += 1
                        bar.update(1)
                        caption, why = clean_caption(reply)
                        if caption is None:
                            self.refuse("caption", k.cand, why=why)
                        else:
                            self.writer.write(self.record(k, caption, "vlm"))

        try:
            asyncio.run(ask())
        finally:
            self.requests = client.stats.as_dict()

    def messages(self, k: Kept) -> list[dict]:
        data = base64.b64encode(self.prepared(k.id).read_bytes()).decode()
        return [{"role": "user", "content": [
            {"type": "text", "text": self.s.prompt},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}]

    def stats(self, started: float) -> dict:
        recs = self.writer.records
        refused = {r: len(v) for r, v in self.refused.items() if v}
        caps = Counter(r.get("caption_source") for r in recs)
        lic = Counter(r.get("license") or "unknown" for r in recs)
        n_ref = sum(refused.values())
        parts = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in refused.items())
        summary = f"{len(recs)} photos kept, {n_ref} refused" + (f" ({parts})" if parts else "")
        out = {"summary": summary, "photos": len(recs), "refused": refused,
               "refused_files": {r: v for r, v in self.refused.items() if v},
               "captions": dict(sorted(caps.items())), "licenses": dict(sorted(lic.items())),
               "size": [self.width, self.height], "fit": self.s.fit,
               "elapsed_s": round(time.perf_counter() - started, 3)}
        if self.requests is not None:
            out["requests"] = self.requests
        return out


_PREFIX = re.compile(r"^\s*(caption|description)\s*:\s*", re.IGNORECASE)


def clean_caption(reply: dict | None) -> tuple[str | None, str]:
    """A VLM reply as a caption, or (None, why it is not one)."""
    if reply is None:
        return None, "no reply (the request failed after its retries)"
    text = " ".join((reply.get("content") or "").split())
    text = _PREFIX.sub("", text).strip().strip('"“”\'`').strip()
    if not text:
        return None, "empty reply"
    if reply.get("finish_reason") == "length":
        return None, "reply cut at sources.max_tokens"
    if len(text.split()) < MIN_CAPTION_WORDS:
        return None, f"not a caption ({text[:60]!r}: fewer than {MIN_CAPTION_WORDS} words)"
    return text, ""


def run_sources(build: Build, rank: int = 0, world_size: int = 1, *, force: bool = False
                ) -> StageResult:
    """Read, check, caption and prepare the configured photos (see the module docstring)."""
    settings = build.config.stage_settings("sources")
    if settings.origin is None:
        raise DsbuildError("sources: no photos configured; set sources.path=FOLDER (a folder "
                           "of photos), sources.dataset=NAME or sources.fiftyone=NAME")

    def work(writer: ShardWriter) -> dict:
        return SourcesRun(build, writer, settings).run()

    return build.run_stage("sources", rank, world_size, work, force=force)
