"""Executors: where a stage's shards run — in process, local worker processes, or a Ray cluster.

Stages never know where they run (datatrove's shape): an executor calls a stage's declared run
function per rank, as the stage's own command does, and ``Build.run_stage`` keeps the markers,
locks and resume. See docs/scale.md.
"""

from __future__ import annotations

from collections.abc import Callable

from dsbuild.core import deps
from dsbuild.executors.base import Executor, ExecutorOptions, ShardFailed
from dsbuild.executors.loop import WorkerPool

__all__ = ["Executor", "ExecutorOptions", "ShardFailed", "WorkerPool", "make_executor"]


def make_executor(options: ExecutorOptions | None = None,
                  echo: Callable[[str], None] = print) -> Executor:
    """The executor for ``options``: in process, local worker processes, or Ray actors."""
    options = options or ExecutorOptions()
    if options.executor == "ray":
        deps.check("ray", what="--executor ray")
        actors = deps.load_target("dsbuild.executors.ray:RayActors", what="--executor ray")
        return WorkerPool(actors(options), options, echo)
    if options.workers > 1:
        from dsbuild.executors.local import LocalProcesses

        return WorkerPool(LocalProcesses(options), options, echo)
    return Executor(options, echo)
