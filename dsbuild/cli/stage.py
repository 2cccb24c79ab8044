"""``dsbuild <stage> BUILD``: each stage's command, derived from its declaration.

A stage declared with ``command=None`` gets BUILD, the shard options (``--rank``,
``--world-size``, the executor options) when it shards, ``--force``, ``--set`` and ``--wait``,
plus one option per settings field named in ``Stage.options`` (saved into dsbuild.yaml as
``--set`` would). The command saves the settings (only once they validate and the models
they name can load: a refused value never reaches dsbuild.yaml), runs the declared run
function (or every rank on an executor) and prints one line per rank and the stage's
``summary`` lines.
"""

from __future__ import annotations

import json

import click

from dsbuild.cli.options import settings_options
from dsbuild.cli.util import (
    build_argument,
    cut_note,
    echo_result,
    run_all_ranks,
    save_settings,
    shard_options,
    wait_option,
)
from dsbuild.core import deps
from dsbuild.core.stages import Stage


def _setting(stage: str, key: str, value) -> str:
    return f"{stage}.{key}={value if isinstance(value, str) else json.dumps(value)}"


def stage_command(st: Stage) -> click.Command:
    """The click command of ``st`` (see the module docstring)."""

    def run(build, force, overrides, rank=0, world_size=1, executor=None, **options):
        from dsbuild.core.build import Build

        b = Build.open(build)
        save_settings(b, [*overrides, *(_setting(st.name, k, v) for k, v in options.items()
                                         if v is not None)])
        if executor is not None and (executor.distributed or executor.shards):
            run_all_ranks(b, st.name, executor, force)
            return
        result = st.load_run()(b, rank, world_size, force=force)
        echo_result(result)
        for line in deps.load_target(st.summary)(b, result) if st.summary else ():
            click.echo(line)
        if not result.skipped and (note := cut_note(b, st.name, result)):
            click.echo(note)

    fn = run
    if st.sharded:
        fn = shard_options(fn)
    else:
        fn = click.option("--force", is_flag=True, help="recompute this stage even where it is "
                          "done")(fn)
        fn = click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE",
                          help="change a setting in dsbuild.yaml before running (repeatable)")(fn)
        fn = wait_option(fn)
    fn = settings_options(st.settings, only=st.options, section=st.name)(fn)
    fn = build_argument(fn)
    text = (f"{st.help[:1].upper()}{st.help[1:]}: the {st.name} stage on BUILD.\n\n"
            f"Its settings are the `{st.name}` section of BUILD/dsbuild.yaml; options and "
            f"--set {st.name}.KEY=VALUE change them there first.")
    return click.command(st.cli_name, help=text)(fn)
