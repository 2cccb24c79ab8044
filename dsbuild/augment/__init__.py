"""No-change augmentation: instructions naming something absent, with output = input.

The stage is declared here, once; everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.augment.settings import AugmentSettings
from dsbuild.core.stages import Stage, register

STAGE = register(Stage(
    name="augment", output="augment", settings=AugmentSettings, upstream=("filter",),
    unit="sample",
    signs=("recipe", "split"), run="dsbuild.augment.stage:run_augment",
    summary="dsbuild.augment.report:summary", help="add no-change samples", key="pair_id",
))
