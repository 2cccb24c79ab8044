"""The sources stage: real photos (a folder, a datasets folder or Hub id, a FiftyOne dataset)
checked, deduplicated, captioned and prepared at the generation size, with their provenance.

Optional and first: a build that names no photos has it off (skipped by ``dsbuild run``, not
signed by captions), so a synthetic build signs and runs as before. Declared here, once;
everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.core.stages import Stage, register
from dsbuild.sources.settings import SourcesSettings

STAGE = register(Stage(
    name="sources", output="photos", settings=SourcesSettings,
    run="dsbuild.sources.stage:run_sources", active="dsbuild.sources.settings:active",
    fingerprint="dsbuild.sources.inputs:fingerprint", check="dsbuild.sources.settings:check_config",
    options=("path", "dataset", "fiftyone", "fit"), unit="photo",
    signs=("generate.height", "generate.width"),
    summary="dsbuild.sources.report:summary", report="dsbuild.sources.report:write_report",
    help="read real photos: content ids, size checks, near-duplicates, captions, provenance",
    sharded=False, extra="photos",
))
