"""The captions stage: LLM agents (or the offline template backend) write caption triples.

The stage is declared here, once; everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.captions.settings import CaptionsSettings
from dsbuild.core.stages import Stage, register

STAGE = register(Stage(
    name="captions", output="triples", settings=CaptionsSettings,
    run="dsbuild.captions.stage:run_captions", command="dsbuild.captions.cli:captions_cmd",
    help="write caption triples with LLM agents", extra="llm", signs=("recipe",),
    check="dsbuild.captions.validate:check_config",
    offline={"backend": "template"},
))
