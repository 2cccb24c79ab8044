"""Region edits as a generator: the edit's region segmented on the source image (the triple's
photo, or a generated source) and repainted by a diffusers inpainting pipeline (SD / SDXL
inpainting, FLUX.1 Fill, FLUX.1 Kontext inpainting; the class read from ``model_index.json``)
under the triple's output caption; the mask is the pair's ``images.mask`` (``edit_mask``).

``settings.py`` is the ``generate.inpaint`` section (the mask, the sweep), ``generator.py``
what the generate stage calls.
"""

from dsbuild.core.generators import Generator, Param, register
from dsbuild.generate.generators.inpaint.settings import InpaintSettings

GENERATOR = register(Generator(
    name="inpaint", impl="dsbuild.generate.generators.inpaint.generator:RegionInpainter",
    help="the edit's region (segmented on the source image or photo) repainted by an "
    "inpainting pipeline (SD/SDXL inpainting, FLUX.1 Fill)", settings=InpaintSettings,
    extra="gen", model="inpaint",
    params=(
        Param("pipeline", "string", "inpaint_pipeline", "the diffusers inpainting pipeline"),
        Param("steps", "int", "inpaint_steps", "inpainting denoising steps"),
        Param("guidance", "float", description="the inpainting pipeline's guidance scale"),
        Param("strength", "float", "inpaint_strength",
              "how far the masked region is noised (1: repainted from noise)"),
        Param("dilate", "int", "mask_dilate", "pixels the segmented mask was grown by"),
        Param("composite", "bool", "inpaint_composite",
              "pixels outside the mask pasted back from the source"),
        Param("mask_from", "string", "mask_from",
              "where the mask came from: segment (the referred phrases) or default (the "
              "default region)"),
        Param("source_model", "string", description="text-to-image model of the source"),
        Param("source_steps", "int", description="the source's denoising steps"),
        Param("source_guidance", "float", description="the source's CFG scale"),
    ),
))
