"""Export a build as a Hub-ready dataset (parquet shards with embedded images, a card) and
push it to the Hugging Face Hub. Heavy imports (datasets, huggingface_hub) stay inside.

The stage is declared here, once; everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.core.stages import Stage, register
from dsbuild.export.settings import ExportSettings

STAGE = register(Stage(
    name="export", output="export", settings=ExportSettings, upstream=("filter",),
    uses=("augment", "diversity", "verify"), signs=("split", "decisions"),
    run="dsbuild.export.writer:run_export",
    help="write train/test splits with a dataset card", extra="export",
    sharded=False, records=False,
))
