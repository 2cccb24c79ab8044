"""An OpenAI-compatible images-edit API as a generator: the triple's instruction sent with a
source image (made from the triple's input caption by a text-to-image model) to
``/v1/images/edits`` through the shared LLM client's machinery (:mod:`dsbuild.llm.images`).

``settings.py`` is the ``generate.api`` section, ``sweep.py`` plans each triple's pairs,
``generator.py`` is what the generate stage calls.
"""

from dsbuild.core.generators import Generator, Param, register
from dsbuild.generate.generators.api.settings import ApiSettings

GENERATOR = register(Generator(
    name="api", impl="dsbuild.generate.generators.api.generator:ImagesEditAPI",
    help="an OpenAI-compatible /v1/images/edits endpoint (gpt-image-1, ...) applied to a "
    "generated source image", settings=ApiSettings, extra="gen", model="sd",
    count="dsbuild.generate.generators.api.sweep:count",
    params=(
        Param("model", "string", "api_model", "the endpoint's image-editing model"),
        Param("size", "string", "api_size", "the size asked for (WxH)"),
        Param("quality", "string", "api_quality", "images.edit quality (unset: the "
              "endpoint's default)"),
        Param("variant", "int", "api_variant", "the edit's number among its source's"),
        Param("extra", "json", "api_extra", "other images.edit parameters sent"),
        Param("source_model", "string", description="text-to-image model of the source"),
        Param("source_steps", "int", description="the source's denoising steps"),
        Param("source_guidance", "float", description="the source's CFG scale"),
    ),
))
