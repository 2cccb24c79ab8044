"""The filter stage: CLIP/DINO scores, InstructPix2Pix thresholds, top-k per triple.

The stage is declared here, once; everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.core.stages import Stage, register
from dsbuild.filter.settings import FilterSettings

STAGE = register(Stage(
    name="filter", output="scores", settings=FilterSettings, upstream=("generate",),
    unit="pair", expected="dsbuild.filter.stage:expected",
    run="dsbuild.filter.stage:run_filter", summary="dsbuild.filter.report:summary",
    help="score pairs with CLIP/DINO and keep the best", extra="filter", key="pair_id",
    report="dsbuild.filter.report:write_report",
    offline={
        "clip_model": "tiny", "clip_pretrained": "none", "dino": False,
        # tiny CLIP scores are noise: thresholds off, top-k still applies
        "clip_sim_0": -1, "clip_sim_1": -1, "clip_sim_dir": -1, "clip_sim_image": -1,
    },
))
