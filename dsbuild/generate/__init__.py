"""The generate stage: image pairs from a generator (Prompt-to-Prompt on Stable Diffusion by
default; see dsbuild.core.generators).

The stage is declared here, once; everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.core.stages import Stage, register
from dsbuild.generate.settings import GenerateSettings

STAGE = register(Stage(
    name="generate", output="pairs", settings=GenerateSettings, upstream=("captions",),
    unit="pair", expected="dsbuild.generate.stage:expected",
    run="dsbuild.generate.stage:run_generate", options=("model",),
    summary="dsbuild.generate.report:summary", report="dsbuild.generate.report:write_report",
    help="make image pairs with a generator (Prompt-to-Prompt by default)", extra="gen",
    verify="dsbuild.core.records:pair_images_problem",
    offline={"model": "tiny", "steps": 4, "height": 64, "width": 64, "per_triple": 2},
))
