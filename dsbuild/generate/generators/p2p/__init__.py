"""Prompt-to-Prompt on Stable Diffusion 1.x/2.x and SDXL (Turbo and Lightning too): the default
generator.

One source image per (input caption, seed, guidance), its targets denoised beside it with the
source's attention injected (self-attention, word swap, refinement, reweighting, local blend).
``sweep.py`` draws each pair's parameters, ``sampler.py`` runs the batched P2P loop on the
diffusers pipeline, ``generator.py`` is what the generate stage calls.
"""

from dsbuild.core.generators import Generator, Param, register
from dsbuild.generate.generators.p2p.settings import P2PSettings

GENERATOR = register(Generator(
    name="p2p", impl="dsbuild.generate.generators.p2p.generator:PromptToPrompt",
    help="Prompt-to-Prompt on Stable Diffusion 1.x/2.x or SDXL, few-step models included "
         "(source and edit in one batch)",
    settings=P2PSettings, extra="gen", model="sd",
    count="dsbuild.generate.generators.p2p.sweep:samples_for",
    params=(
        Param("mode", "string", "p2p_mode", "P2P edit: self | replace | refine | reweight"),
        Param("steps", "int", "p2p_steps", "denoising steps"),
        Param("guidance", "float", description="classifier-free guidance scale"),
        Param("cross_replace", "float",
              description="fraction of steps with the source's cross-attention"),
        Param("self_replace", "float",
              description="fraction of steps with the source's self-attention"),
        Param("scheduler", "string", description="diffusers scheduler"),
        Param("blend_words", "json", description="local blend words (source, target)",
              role="edit_words"),
        Param("equalizer", "json", description="reweighted target words and their scale"),
    ),
))
