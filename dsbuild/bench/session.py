"""``dsbuild bench session``: a multi-turn session in one P2P pass against independent pairs.

Everything runs in one process on one model, through the P2P sampler the generate stage uses
(``generate/generators/p2p/sampler.py``): a 3-turn chain in one pass (4 images: the root and
each turn, each turn's row reading its parent's) against its 3 turns made as 3 independent
P2P pairs (6 images), and a tree of a root and 4 children in one pass (5 images) against 4
independent pairs (8 images). The floors are 4/6 = 0.667 and 5/8 = 0.625. The plain library
doing the same images is timed beside them: plain diffusers making each pair's two images in
one call, and a session's images in one call. Every call encodes its captions, as the plain
pipeline does. CPU seconds (``time.process_time``) with one torch thread by default on CPU,
wall seconds on CUDA; every case warmed up once, the order reversed every repeat.

The process keeps the memory it frees (glibc ``mallopt``): cases alternate batch shapes, and
with glibc's default a batch of another shape than the call before maps fresh pages (tens of
thousands of page faults, ~10% of a 4-image call on CPU) that a stage making batch after
batch of one shape never pays. Both sides run under the same setting.
"""

from __future__ import annotations

import click

from dsbuild.bench.harness import (
    ARCHS,
    device_option,
    emit,
    json_option,
    ratio,
    rounded,
    setup,
    table,
    time_cases,
    torch_threads,
)

ROOT = "a red velvet armchair in a bright living room"
CHAIN = ["a blue velvet armchair in a bright living room",
         "a blue leather armchair in a bright living room",
         "a blue leather armchair in a dark living room"]
TREE = ["a blue velvet armchair in a bright living room",
        "a green velvet armchair in a bright living room",
        "a red leather armchair in a bright living room",
        "a red velvet armchair in a dark living room"]
EDIT = dict(mode="replace", self_replace=0.4, cross_replace=0.8)
GOALS = {"chain3/3_pairs": 0.69, "tree4/4_pairs": 0.64}


def keep_freed_memory() -> bool:
    """glibc: serve large blocks from the heap and never trim it (False where not glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3) at its 32 MiB maximum, M_TRIM_THRESHOLD (-1) at 1 GiB
        return bool(libc.mallopt(-3, 32 * 2**20)) and bool(libc.mallopt(-1, 2**30))
    except (OSError, AttributeError):
        return False


def run_bench(model: str | None = None, arch: str = "tiny", steps: int = 8,
              resolution: int = 64, device: str = "auto", repeats: int = 3,
              threads: int | None = 1) -> dict:
    """Time one-pass sessions against independent pairs; returns figures, ratios and goals
    (no assertions)."""
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from dsbuild.generate.generators.p2p.sampler import (
        P2PGenerator,
        SourceGroup,
        TargetSpec,
        make_scheduler,
    )
    from dsbuild.models import load_sd_pipeline

    dev = setup(device, threads)
    kept = keep_freed_memory()
    pipe = load_sd_pipeline(model or ("tiny" if arch == "tiny" else f"arch:{arch}"), "fp32",
                            dev, quiet=True)
    label = model or f"arch:{arch} (random weights)"
    sched_name, seed, g = "euler_ancestral", 0, 7.5
    gen = P2PGenerator(pipe, sched_name)
    layers = [(m, m.processor) for m in pipe.unet.modules() if isinstance(m, Attention)]
    stock = AttnProcessor2_0()

    def plain(prompts: list[str]):
        def run():
            for m, _ in layers:
                m.set_processor(stock)
            pipe.scheduler = make_scheduler(sched_name, pipe.scheduler.config)
            try:
                gens = [torch.Generator().manual_seed(seed) for _ in prompts]
                pipe(prompts, num_inference_steps=steps, guidance_scale=g, height=resolution,
                     width=resolution, generator=gens, output_type="np")
            finally:
                for m, proc in layers:
                    m.set_processor(proc)
        return run

    def pairs(edges: list[tuple[str, str]], p2p: bool = True):
        def run():
            for src, tgt in edges:
                if p2p:
                    gen.forget_text()
                    gen.generate([SourceGroup(src, seed, g, [TargetSpec(tgt, **EDIT)])],
                                 steps, resolution, resolution, batch_size=2)
                else:
                    plain([src, tgt])()
        return run

    def session(prompts: list[str], parents: list[int | None]):
        def run():
            gen.forget_text()
            targets = [TargetSpec(p, **EDIT, parent=up)
                       for p, up in zip(prompts, parents, strict=True)]
            gen.generate([SourceGroup(ROOT, seed, g, targets)], steps, resolution, resolution,
                         batch_size=len(targets) + 1)
        return run

    chain_edges = list(zip([ROOT, *CHAIN[:-1]], CHAIN, strict=True))
    tree_edges = [(ROOT, t) for t in TREE]
    cases = {
        "chain3_one_pass": session(CHAIN, [None, 0, 1]),
        "chain3_3_pairs": pairs(chain_edges),
        "tree4_one_pass": session(TREE, [None] * len(TREE)),
        "tree4_4_pairs": pairs(tree_edges),
        "plain_chain3_images": plain([ROOT, *CHAIN]),
        "plain_chain3_3_pairs": pairs(chain_edges, p2p=False),
        "plain_tree4_images": plain([ROOT, *TREE]),
        "plain_tree4_4_pairs": pairs(tree_edges, p2p=False),
    }
    t = time_cases(cases, dev, repeats, memory=True, alternate=True)
    out = {"model": label, "pipeline": type(pipe).__name__, "device": dev, "steps": steps,
           "resolution": resolution, "threads": torch_threads(), "repeats": repeats,
           "memory_kept": kept,
           "seconds": t.seconds("wall"), "cpu_seconds": t.seconds("cpu"), "peak_mb": t.peak_mb,
           "floors": {"chain3/3_pairs": round(4 / 6, 3), "tree4/4_pairs": round(5 / 8, 3)}}
    out["ratios"] = _ratios(out["seconds"])
    if dev == "cpu":  # process CPU time: robust to other processes sharing the cores
        out["ratios_cpu_time"] = _ratios(out["cpu_seconds"])
        out["ratios_cpu_time_best"] = _ratios(t.seconds("cpu", "min"))
    basis = out.get("ratios_cpu_time", out["ratios"])
    out["goals_basis"] = "cpu time" if "ratios_cpu_time" in out else "wall time"
    out["goals"] = {f"{k} <= {v}": basis[k] <= v for k, v in GOALS.items()}
    for key in ("seconds", "cpu_seconds"):
        out[key] = rounded(out[key], 4)
    out["peak_mb"] = rounded(out["peak_mb"], 1)
    return out


def _ratios(sec: dict) -> dict:
    """One pass against the independent pairs, for P2P and for plain diffusers (the plain
    library making the same images: one call of the session's images against a call per
    pair)."""
    return {
        "chain3/3_pairs": ratio(sec["chain3_one_pass"], sec["chain3_3_pairs"]),
        "tree4/4_pairs": ratio(sec["tree4_one_pass"], sec["tree4_4_pairs"]),
        "plain_chain3/3_pairs": ratio(sec["plain_chain3_images"], sec["plain_chain3_3_pairs"]),
        "plain_tree4/4_pairs": ratio(sec["plain_tree4_images"], sec["plain_tree4_4_pairs"]),
        "chain3_one_pass/plain_images": ratio(sec["chain3_one_pass"],
                                              sec["plain_chain3_images"]),
        "tree4_one_pass/plain_images": ratio(sec["tree4_one_pass"], sec["plain_tree4_images"]),
    }


@click.command("session")
@click.option("--model", default=None, help="diffusers SD or SDXL dir or Hub id, or a built "
              "one: tiny-sdxl, arch:small-sdxl (default: --arch)")
@click.option("--arch", type=click.Choice(ARCHS), default="tiny", show_default=True,
              help="random-weight model built from config (sd15 = SD 1.5 shapes)")
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--resolution", type=int, default=64, show_default=True,
              help="image height and width")
@device_option
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads")
@json_option
def bench_session(model, arch, steps, resolution, device, repeats, threads, as_json):
    """Time a 3-turn chain and a 4-child tree in one P2P pass vs independent P2P pairs."""
    emit(run_bench(model, arch, steps, resolution, device, repeats, threads), as_json, _lines)


def _lines(res: dict):
    """The result for people."""
    yield (f"model {res['model']} ({res['pipeline']}) on {res['device']}, "
           f"{res['resolution']}px, {res['steps']} steps, threads={res['threads']}, "
           f"median of {res['repeats']}")
    pm = res["peak_mb"]
    yield from table([("case", 24), ("wall s", 10), ("cpu s", 10), ("peak MB", 10)],
                     [(name, f"{s:.3f}", f"{res['cpu_seconds'][name]:.3f}",
                       f"{pm[name]:.0f}" if pm[name] is not None else "-")
                      for name, s in res["seconds"].items()])
    cpu = res.get("ratios_cpu_time", {})
    best = res.get("ratios_cpu_time_best", {})
    yield f"{'ratio':<32}{'wall':>7}{'cpu':>8}{'cpu best':>10}" if cpu else "ratios (wall time):"
    for name, r in res["ratios"].items():
        yield f"  {name:<30}{r:>7.3f}" + (f"{cpu[name]:>8.3f}{best[name]:>10.3f}" if cpu else "")
    for goal, ok in res["goals"].items():
        yield f"  goal {goal} ({res['goals_basis']}; floor " \
              f"{res['floors'][goal.split(' ')[0]]}): {'met' if ok else 'NOT met'}"
