"""The API generator's own settings, the ``generate.api`` section: the endpoint (the LLM
settings' names and transport knobs, :class:`~dsbuild.llm.settings.EndpointSettings`), the
images.edit parameters, and where the source image comes from.

The image size is ``generate.width`` x ``generate.height``, sent as the request's ``size``;
a returned image of another size is counted as bad, never written. With ``n`` > 1 the
variants of one source and instruction (they differ only by the endpoint's sampling) are
asked ``n`` at a time, one request returning up to ``n`` images.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from dsbuild.generate.generators.source import SourceGuidance, SourceSteps
from dsbuild.llm.settings import TRANSPORT, EndpointSettings


class ApiSettings(EndpointSettings):
    """``generate.api.*``: an OpenAI-compatible /v1/images/edits endpoint."""

    volatile: ClassVar[frozenset[str]] = TRANSPORT | {"price_per_image"}

    model: str = Field("gpt-image-1", description="the endpoint's image-editing model")
    timeout: float = Field(180.0, gt=0, description="seconds per request before a retry "
                           "(image edits are slow)")
    quality: str | None = Field(None, description="images.edit quality (low, medium, high, "
                                "auto for gpt-image-1; standard for dall-e-2); unset: the "
                                "endpoint's default")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="unset: not sent (gpt-image-1 always returns b64_json); set "
        "b64_json for endpoints that default to url (a url is fetched only from 127.0.0.1)")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="other images.edit parameters the endpoint takes "
        "(e.g. input_fidelity), sent as they are and recorded in each pair's params")
    variants: int = Field(1, ge=1, description="edits per source image (one request each, "
                          "or n per request)")
    n: int = Field(1, ge=1, le=10, description="images per request (images.edit n): the "
                   "variants of one source and instruction are asked n at a time, where the "
                   "endpoint allows it (gpt-image-1, dall-e-2); each image is checked alone")
    source_model: str | None = Field(
        None, description="text-to-image model that makes each source image from the "
        "triple's input caption (SD 1.x/2.x folder or Hub id, or 'tiny'); default: "
        "generate.model")
    source_steps: SourceSteps = None
    source_guidance: SourceGuidance = 7.5
    price_per_image: float | None = Field(
        None, ge=0, description="what one returned image costs (any currency): the report "
        "adds up the cost of the images billed and of those served from the cache")

    def signature_dict(self) -> dict[str, Any]:
        data = super().signature_dict()
        if data.get("n") == 1:  # one image per request: signed as before n existed
            data.pop("n")
        return data
