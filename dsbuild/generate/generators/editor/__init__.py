"""Instruction editors as a generator: a diffusers editing pipeline (InstructPix2Pix, SDXL
InstructPix2Pix, FLUX.1 Kontext, Qwen-Image-Edit; the class read from ``model_index.json``)
applied with the triple's instruction to a source image that a text-to-image model makes from
the triple's input caption.

``settings.py`` is the ``generate.editor`` section, ``sweep.py`` draws each pair's seed and
guidance knobs, ``drivers.py`` runs each pipeline on a batch of variants, ``generator.py`` is
what the generate stage calls.
"""

from dsbuild.core.generators import Generator, Param, register
from dsbuild.generate.generators.editor.settings import EditorSettings

GENERATOR = register(Generator(
    name="editor", impl="dsbuild.generate.generators.editor.generator:InstructionEditor",
    help="a diffusers editing pipeline (InstructPix2Pix, FLUX.1 Kontext, ...) applied to a "
    "generated source image", settings=EditorSettings, extra="gen", model="editor",
    params=(
        Param("pipeline", "string", "editor_pipeline", "the diffusers editing pipeline class"),
        Param("steps", "int", "editor_steps", "editing denoising steps"),
        Param("guidance", "float", description="text guidance (InstructPix2Pix), embedded "
              "guidance (FLUX.1 Kontext) or true CFG scale (Qwen-Image-Edit)"),
        Param("image_guidance", "float", description="image guidance (InstructPix2Pix)"),
        Param("source_model", "string", description="text-to-image model of the source"),
        Param("source_steps", "int", description="the source's denoising steps"),
        Param("source_guidance", "float", description="the source's CFG scale"),
    ),
))
