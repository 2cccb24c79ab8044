"""The captions stage: LLM agents (or the offline template backend) write caption triples.

The stage is declared here, once; everything else derives from it (see dsbuild.core.stages).
"""

from dsbuild.captions.settings import CaptionsSettings
from dsbuild.core.stages import Stage, register

STAGE = register(Stage(
    name="captions", output="triples", settings=CaptionsSettings,
    unit="triple", expected="dsbuild.captions.stage:expected",
    run="dsbuild.captions.stage:run_captions", options=("backend",),
    summary="dsbuild.captions.report:summary",
    # no extra: the template backend needs none; the openai one checks the llm extra itself
    help="write caption triples with LLM agents", signs=("recipe",),
    # photos, where the build names any (sources is off, and unsigned, in a synthetic build)
    uses=("sources",),
    check="dsbuild.captions.validate:check_config",
    report="dsbuild.captions.report:write_report", report_each_rank=True,
    offline={"backend": "template"},
))
