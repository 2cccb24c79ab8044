"""``dsbuild bench scale``: generate throughput with 1 vs 2 local workers on this machine.

The same captions, the same shards and the same settings are generated twice, by one worker
and by two, each worker pinned to one CPU thread (or one GPU where there are two). The measure
is wall time of the whole stage — worker start, model load and the shards — because that is
what a user waits for; CPU time would hide exactly what scaling is about. The machine must be
otherwise idle for the number to mean anything: the load average before each run is reported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import click

from dsbuild.bench.harness import emit, json_option, ratio, resolution_option, table
from dsbuild.core import stages
from dsbuild.core.build import Build
from dsbuild.core.config import default_recipe_path, load_recipe
from dsbuild.core.deprecation import renamed_option
from dsbuild.executors import ExecutorOptions, WorkerPool, make_executor
from dsbuild.executors.local import LocalProcesses


def run_bench(per_agent: int, per_triple: int, steps: int, resolution: int, shards: int,
              workers: tuple[int, ...] = (1, 2), keep: str | None = None) -> dict:
    """Generate the same pairs with each worker count; pairs/s and scaling efficiency."""
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="dsbuild-bench-scale-"))
    settings = [*stages.offline_settings(), f"captions.per_agent={per_agent}",
                f"generate.per_triple={per_triple}", f"generate.steps={steps}",
                f"generate.height={resolution}", f"generate.width={resolution}",
                "generate.contact_sheet=0"]
    recipe = default_recipe_path()
    base = Build.init(tmp / "captions", load_recipe(recipe), recipe_path=str(recipe),
                      overrides=settings, exist_ok=True)
    with make_executor(ExecutorOptions(threads_per_worker=1)) as ex:
        ex.run(base, "captions")
    runs = {}
    try:
        for n in workers:
            root = tmp / f"workers-{n}"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(base.root, root, ignore=shutil.ignore_patterns("logs", ".locks"))
            b = Build.open(root)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            # one worker runs in a worker process too, so both sides pay the same start-up
            opts = ExecutorOptions(executor="local", workers=n, shards=shards, threads_per_worker=1)
            with WorkerPool(LocalProcesses(opts), opts, echo=lambda s: None) as ex:
                res = ex.run(b, "generate")
            secs = time.perf_counter() - t0
            marks = b.markers("generate")
            gen_s = sum(m["stats"].get("seconds", 0) for m in marks.values())
            runs[n] = {"pairs": res.records, "wall_s": round(secs, 2),
                       "pairs_per_s": round(res.records / secs, 4),
                       "shard_seconds_sum": round(gen_s, 2), "load_before": round(load, 2)}
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    one, many = runs[workers[0]], runs[workers[-1]]
    eff = many["pairs_per_s"] / (one["pairs_per_s"] * workers[-1] / workers[0])
    return {"cpus": os.cpu_count(), "shards": shards, "steps": steps, "resolution": resolution,
            "threads_per_worker": 1, "runs": {str(k): v for k, v in runs.items()},
            "speedup": ratio(many["pairs_per_s"], one["pairs_per_s"]),
            "efficiency": round(eff, 3), "goal_efficiency": 0.9,
            "goal_met": eff >= 0.9,
            "idle": all(r["load_before"] < 0.5 for r in runs.values()),
            "basis": "wall time of the generate stage, each worker pinned to one thread"}


@click.command("scale")
@renamed_option("--limit", "--per-agent", "per_agent", type=click.IntRange(min=1))
@renamed_option("--samples", "--per-triple", "per_triple", type=click.IntRange(min=1))
@click.option("--per-agent", type=click.IntRange(min=1), default=1, show_default=True,
              help="caption triples per agent (offline recipe, template captions)")
@click.option("--per-triple", type=click.IntRange(min=1), default=2, show_default=True,
              help="pairs per triple")
@click.option("--steps", type=int, default=4, show_default=True)
@resolution_option(64, "image height and width")
@click.option("--shards", type=int, default=8, show_default=True,
              help="shards (the same for every worker count)")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="keep the builds in this folder (default: a temp folder, removed)")
@json_option
def bench_scale(per_agent, per_triple, steps, resolution, shards, keep, as_json):
    """Generate throughput (tiny model) with 1 vs 2 local workers: pairs/s, scaling efficiency.

    Wall time, each worker pinned to one thread; run it on an otherwise idle machine."""
    emit(run_bench(per_agent, per_triple, steps, resolution, shards, keep=keep), as_json,
         _lines)


def _lines(res: dict):
    """The result for people."""
    yield (f"generate, tiny model, {res['resolution']}px, {res['steps']} steps, {res['shards']} "
           f"shards, {res['cpus']} CPUs, one thread per worker ({res['basis']})")
    yield from table([("workers", 9), ("pairs", 7), ("wall s", 9), ("pairs/s", 10),
                      ("load before", 13)],
                     [(n, str(r["pairs"]), f"{r['wall_s']:.2f}", f"{r['pairs_per_s']:.3f}",
                       f"{r['load_before']:.2f}") for n, r in res["runs"].items()])
    yield (f"speedup {res['speedup']:.2f}x, scaling efficiency {res['efficiency']:.2f} "
           f"(goal >= {res['goal_efficiency']}: {'met' if res['goal_met'] else 'NOT met'})")
    if not res["idle"]:
        yield ("note: the machine was not idle (load average >= 0.5 before a run); other "
               "work shares the cores, so the efficiency is a lower bound")
