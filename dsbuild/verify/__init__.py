"""The verify stage: did each edit happen, and only where it should (see docs/verify.md).

The stage is declared here, once; everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.core.stages import Stage, register
from dsbuild.verify.settings import VerifySettings

STAGE = register(Stage(
    name="verify", output="verify", settings=VerifySettings, upstream=("filter",),
    unit="pair", expected="dsbuild.verify.stage:expected",
    run="dsbuild.verify.stage:run_verify", summary="dsbuild.verify.report:summary",
    help="check each kept edit with a detector (and a VLM judge)", extra="filter",
    key="pair_id",
    report="dsbuild.verify.report:write_report",
    offline={
        # the tiny detector/CLIP/DINO give noise too: detector and change thresholds off; the
        # near-copy bound (pixels, no model) still applies
        "detector": "tiny", "clip_model": "tiny", "clip_pretrained": "none",
        "dino_model": "tiny", "present_min": 0, "absent_max": 1, "change_dir_min": -1,
        "rest_min": -1,
    },
))
