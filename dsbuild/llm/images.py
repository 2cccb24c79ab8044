"""Image edits from an OpenAI-compatible ``/v1/images/edits`` endpoint, with the chat client's
machinery (:mod:`dsbuild.llm.client`): the openai SDK's ``images.edit`` (multipart: the source
PNG and the prompt), ``concurrency`` requests in flight, retries with backoff that honour
Retry-After, the dead-endpoint fail-fast, and a request cache in the build keyed by (endpoint,
model, source image bytes, prompt, parameters, sample), so a re-run or a resumed run pays for
no image twice.

A reply's image is kept as the endpoint sent it (base64 PNG/JPEG/WebP bytes; a ``url`` reply
is fetched only from 127.0.0.1, never from anywhere else) and checked by the caller. What was
asked and paid is counted: images requested, images billed (replies with an image this run),
images served from the cache, token usage where the endpoint reports it, and the cost when
a price per image is set.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from urllib.parse import urlparse

from dsbuild.llm.client import ChatClient, RequestCache, Retryable

LOCAL_HOSTS = frozenset({"127.0.0.1"})  # the only host a url reply is fetched from


class ImageEditClient(ChatClient):
    """Edits of one image by a prompt from one endpoint. ``settings`` is an
    :class:`~dsbuild.llm.settings.EndpointSettings` (generate.api); ``params`` are the
    images.edit parameters besides model and prompt (size, quality, ...)."""

    def __init__(self, settings, cache: RequestCache | None, *, section: str,
                 params: dict, price_per_image: float | None = None, on_retry=None):
        super().__init__(settings, cache, section=section, on_retry=on_retry)
        self.params = dict(params)
        self.price = price_per_image
        self.images = Counter()  # requested, billed, cached

    def payload(self, prompt: str) -> dict:  # type: ignore[override]
        return {"model": self.settings.model, "prompt": prompt, **self.params}

    async def edit(self, image: bytes, prompt: str, sample: object = None,
                   n: int = 1) -> dict | None:
        """``{"images": [base64 str | None, ...], "usage": {...}}`` for editing ``image``
        (PNG bytes) by ``prompt``, ``n`` images in one request (images.edit ``n``; not sent
        at 1), from the cache or the endpoint; None if it failed."""
        if self._sem is None:
            raise RuntimeError("use ImageEditClient inside 'async with'")
        payload = self.payload(prompt)
        if n > 1:
            payload["n"] = n
        key = RequestCache.key({"api": "images.edit", **payload,
                                "image_sha256": hashlib.sha256(image).hexdigest(),
                                "base_url": self.settings.base_url}, sample)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            self.stats.cached += 1
            self.stats.usage_cached.update(hit.get("usage") or {})
            self.images["cached"] += len(hit.get("images") or [])
            return hit
        self.images["requested"] += int(payload.get("n") or 1)
        async with self._sem:
            reply = await self._request({**payload, "image": ("source.png", image, "image/png")})
        if reply is not None:
            self.stats.usage.update(reply["usage"])
            self.images["billed"] += len(reply["images"])
            if self.cache is not None:
                self.cache.put(key, reply)
        return reply

    def counts(self) -> dict:
        """Images requested, billed and cached this run, and their cost where priced."""
        out = {k: int(self.images.get(k, 0)) for k in ("requested", "billed", "cached")}
        if self.price is not None:
            out["cost"] = round(out["billed"] * self.price, 6)
            out["cost_saved_by_cache"] = round(out["cached"] * self.price, 6)
        return out

    async def _call(self, payload: dict) -> dict:
        resp = await self._send(self._client.images.edit, payload, api="images edits")
        data = None if isinstance(resp, str) else getattr(resp, "data", None)
        if not data:  # not an images response (a proxy's page, a chat server): never cached
            raise Retryable("bad_response", error=f"a reply that is not an images response "
                            f"from {self.endpoint}; set {self.section}.base_url to an "
                            "OpenAI-compatible API with /v1/images/edits")
        images = [d.b64_json if getattr(d, "b64_json", None) else await self._fetch(d)
                  for d in data]
        usage = getattr(resp, "usage", None)
        tokens = {}
        if usage is not None:  # images usage: input/output tokens, counted as prompt/completion
            tokens = {"prompt_tokens": int(getattr(usage, "input_tokens", 0) or 0),
                      "completion_tokens": int(getattr(usage, "output_tokens", 0) or 0),
                      "total_tokens": int(getattr(usage, "total_tokens", 0) or 0)}
        return {"images": images, "usage": tokens}

    async def _fetch(self, item) -> str | None:
        """A url reply's image as base64, fetched only from 127.0.0.1 (None: not fetched or
        not there; the caller counts it as a bad image)."""
        url = getattr(item, "url", None)
        if not url or urlparse(url).hostname not in LOCAL_HOSTS:
            return None
        import httpx

        try:
            async with httpx.AsyncClient(timeout=self.settings.timeout) as http:
                r = await http.get(url)
        except httpx.HTTPError as exc:
            raise Retryable("connection", error=f"fetching {url}: {exc}") from None
        if r.status_code != 200:
            return None
        return base64.b64encode(r.content).decode("ascii")


def decode_image(b64: str | None, width: int, height: int):
    """The float H x W x 3 image in [0, 1] of a returned base64 image, or (None, why) when it
    is no image, is another size than asked or has a mode that is not RGB(A)."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not b64:
        return None, "no_image"
    try:
        raw = base64.b64decode(b64, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.size != (width, height):
                return None, "wrong_size"
            if im.mode not in ("RGB", "RGBA"):
                return None, "wrong_mode"
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255, None
    except (ValueError, UnidentifiedImageError, OSError):
        return None, "not_an_image"

