"""Render docs/cli.md from the click commands, so the CLI reference never drifts from the code.

``python -m dsbuild.cli.doc > docs/cli.md`` rewrites it; a test fails when the two differ.
"""

from __future__ import annotations

import click

HEADER = """\
# CLI reference

Generated from the commands themselves (`python -m dsbuild.cli.doc > docs/cli.md`); a test
fails when this page and the code disagree. Every command is a thin layer over a Python
function you can import (see each stage's page). Settings not shown as options are set with
`--set STAGE.KEY=VALUE` (frozen into `dsbuild.yaml`) or by editing `dsbuild.yaml`; each
stage's page lists its settings.

Exit codes: 0 success; 1 a missed `--fail-under`/`--fail-over`/`--baseline` gate, or a stage
that ran but whose output does not count as done (empty or short output, no pair kept by the
filter, a judge that scored nothing, an endpoint that stopped answering: nothing is lost, no
completion marker, run the same command again), or the environment failed (a full disk, an
unreachable database or Hub); 2 an error dsbuild explains on stderr (bad input, a file, line or
field to fix; a missing optional dependency, with its `pip install 'dsbuild[extra]'` line; a
rank, sharding or output folder another process is writing; settings that differ from the
frozen ones without `--reconfigure`) or a usage error (unknown option, bad value); 130
interrupted.

One name per idea: `--resolution` (image side), `--precision` (auto|fp32|fp16|bf16),
`--method`, `--per-agent` / `--per-triple` / `--rows` (the three limits), `--ray-address` (a Ray
cluster) and `--host` (the FiftyOne App), BUILD first. The old names still work for one release
and print `dsbuild: --old is deprecated, use --new (removed in the next release)`: `--dtype`,
`--mixed-precision` (`no` is fp32), `--size` and `--image-size` (bench), train-generator's
`--mode`, `--limit` (run, eval, bench scale), bench scale's `--samples`, `--address`, export's
`--to`, `dsbuild run [RECIPE] --out BUILD`, and the settings `captions.limit` (now
`captions.per_agent`) and `generate.limit` (now `generate.per_triple`).
"""


def _walk(cmd: click.Command, ctx: click.Context, path: list[str]):
    yield path, cmd, ctx
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            yield from _walk(sub, sub_ctx, [*path, name])


def render() -> str:
    """The whole Markdown page."""
    from dsbuild.cli import cli

    out = [HEADER]
    root = click.Context(cli, info_name="dsbuild", terminal_width=100, max_content_width=100,
                         help_option_names=["-h", "--help"])
    for path, cmd, ctx in _walk(cli, root, ["dsbuild"]):
        ctx.terminal_width = ctx.max_content_width = 100
        title = " ".join(path)
        out.append(f"\n## `{title}`\n")
        help_text = cmd.get_help(ctx).rstrip()
        out.append("```text\n" + help_text + "\n```\n")
    return "".join(out)


if __name__ == "__main__":
    print(render(), end="")
