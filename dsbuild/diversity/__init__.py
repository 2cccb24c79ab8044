"""The diversity report stage: lexical diversity of the caption text (also a CI gate).

The stage is declared here, once; everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.core.stages import Stage, register
from dsbuild.diversity.settings import DiversitySettings

STAGE = register(Stage(
    name="diversity", output="reports/diversity.md", settings=DiversitySettings,
    upstream=("captions",), run="dsbuild.diversity.stage:run_diversity",
    command_name="report",
    help="reports (diversity of the caption text)", extra="diversity",
    sharded=False, records=False,
))
