"""``dsbuild bench p2p``: P2P pair cost against plain diffusers making the same two images.

Everything runs in one process on one model: plain ``StableDiffusionPipeline`` (or, for an SDXL
model such as ``tiny-sdxl``, ``StableDiffusionXLPipeline``; stock SDPA processors) making the
source and target images in one batch of two, dsbuild P2P in each mode, and K targets sharing
one source against K separate pairs. Reported as ratios. Both sides are timed alike: every
call encodes its captions (P2P's embedding cache is cleared per pair) and the plain side's
processor swap is per module (microseconds), not a UNet-wide walk inside its timed call.
"""

from __future__ import annotations

import click

from dsbuild.bench.harness import (
    ARCHS,
    device_option,
    emit,
    json_option,
    precision_option,
    ratio,
    resolution_option,
    rounded,
    setup,
    table,
    time_cases,
    torch_threads,
)

SRC = "a red velvet armchair in a bright living room"
TARGETS = {
    "self": dict(prompt="a blue velvet armchair in a bright living room", mode="self",
                 self_replace=1.0),
    "replace": dict(prompt="a blue velvet armchair in a bright living room", mode="replace",
                    self_replace=0.4, cross_replace=0.8),
    "refine": dict(prompt="a red velvet armchair with a cushion in a bright living room",
                   mode="refine", self_replace=0.4, cross_replace=0.8),
    "reweight": dict(prompt="a blue velvet armchair in a bright living room", mode="reweight",
                     self_replace=0.4, cross_replace=0.8, equalizer={"blue": 2.0}),
    "replace+blend": dict(prompt="a blue velvet armchair in a bright living room",
                          mode="replace", self_replace=0.4, cross_replace=0.8,
                          blend_words=(["red"], ["blue"])),
}


def run_bench(model: str | None = None, arch: str = "tiny", steps: int = 8,
              resolution: int = 64, k: int = 8, precision: str = "fp32", device: str = "auto",
              repeats: int = 2, threads: int | None = None) -> dict:
    """Time plain vs P2P pairs; returns figures and ratios (no assertions)."""
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
    pipe = load_sd_pipeline(model or ("tiny" if arch == "tiny" else f"arch:{arch}"), precision, dev,
                            quiet=True)
    label = model or f"arch:{arch} (random weights)"
    xl = type(pipe).__name__ == "StableDiffusionXLPipeline"
    sched_name = "euler_ancestral"
    gen = P2PGenerator(pipe, sched_name)
    # the plain side swaps in stock processors module by module (microseconds; the UNet-wide
    # set_attn_processor walk would add milliseconds to the baseline's timed call)
    layers = [(m, m.processor) for m in pipe.unet.modules() if isinstance(m, Attention)]
    stock = AttnProcessor2_0()
    seed, g = 0, 7.5

    def plain_pair():
        for m, _ in layers:
            m.set_processor(stock)
        pipe.scheduler = make_scheduler(sched_name, pipe.scheduler.config)
        try:
            gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
            pipe([SRC, TARGETS["self"]["prompt"]], num_inference_steps=steps, guidance_scale=g,
                 height=resolution, width=resolution, generator=gens, output_type="np")
        finally:
            for m, proc in layers:
                m.set_processor(proc)

    def p2p(targets: list[dict], batch: int | None = None):
        def run():
            gen.forget_text()  # each pair encodes its captions, as the plain pipeline does
            gen.generate([SourceGroup(SRC, seed, g, [TargetSpec(**t) for t in targets])], steps,
                         resolution, resolution, batch_size=batch or len(targets) + 1)
        return run

    variants = [dict(TARGETS["self"], self_replace=0.1 + 0.8 * i / max(1, k - 1))
                for i in range(k)]
    cases = {"plain_pair": plain_pair, **{f"p2p_{m}": p2p([t]) for m, t in TARGETS.items()},
             f"p2p_shared_k{k}": p2p(variants)}
    # median of wall and of CPU time; the order reverses every repeat (no case always first)
    t = time_cases(cases, dev, repeats, memory=True, alternate=True)
    out = {"model": label, "pipeline": type(pipe).__name__, "device": dev,
           "precision": precision, "steps": steps,
           "resolution": resolution,
           "k": k, "threads": torch_threads(), "repeats": repeats,
           "seconds": t.seconds("wall"), "cpu_seconds": t.seconds("cpu"), "peak_mb": t.peak_mb}
    out["ratios"] = _ratios(out["seconds"], k)
    if dev == "cpu":  # process CPU time: robust to other processes sharing the cores
        out["ratios_cpu_time"] = _ratios(out["cpu_seconds"], k)
        # best repeat of each case: other jobs on the cores only ever add time
        out["ratios_cpu_time_best"] = _ratios(t.seconds("cpu", "min"), k)
    basis = out.get("ratios_cpu_time", out["ratios"])
    out["goals_basis"] = "cpu time" if "ratios_cpu_time" in out else "wall time"
    if xl:  # issue 26: every mode within 2% of plain SDXL, K shared <= 0.57 of K pairs
        out["goals"] = {f"{m}/plain <= 1.02": basis[f"{m}/plain"] <= 1.02 for m in TARGETS}
        out["goals"][f"shared_k{k} <= 0.57 x {k} pairs"] = \
            basis[f"shared_k{k}/{k}_separate"] <= 0.57
    else:
        out["goals"] = {
            "self/plain <= 1.10": basis["self/plain"] <= 1.10,
            "replace/plain <= 1.10": basis["replace/plain"] <= 1.10,
            f"shared_k{k} <= 0.60 x {k} pairs": basis[f"shared_k{k}/{k}_separate"] <= 0.60,
        }
    for key in ("seconds", "cpu_seconds"):
        out[key] = rounded(out[key], 4)
    out["peak_mb"] = rounded(out["peak_mb"], 1)
    return out


def _ratios(sec: dict, k: int) -> dict:
    """Each mode against the plain pair; K shared targets against K separate pairs."""
    r = {f"{m}/plain": ratio(sec[f"p2p_{m}"], sec["plain_pair"]) for m in TARGETS}
    r[f"shared_k{k}/{k}_separate"] = ratio(sec[f"p2p_shared_k{k}"], k * sec["p2p_self"])
    return r


@click.command("p2p")
@click.option("--model", default=None, help="diffusers SD or SDXL dir or Hub id, or a built "
              "one: tiny-sdxl, arch:small-sdxl (default: --arch)")
@click.option("--arch", type=click.Choice(ARCHS), default="tiny", show_default=True,
              help="random-weight model built from config (sd15 = SD 1.5 shapes)")
@click.option("--steps", type=int, default=8, show_default=True)
@resolution_option(64, "image height and width")
@click.option("--k", type=int, default=8, show_default=True, help="targets sharing a source")
@precision_option(("fp32", "fp16", "bf16"), "fp32", help="pipeline precision")
@device_option
@click.option("--repeats", type=int, default=2, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@json_option
def bench_p2p(model, arch, steps, resolution, k, precision, device, repeats, threads, as_json):
    """Time per pair and peak memory: plain diffusers vs dsbuild P2P in each mode."""
    emit(run_bench(model, arch, steps, resolution, k, precision, device, repeats, threads),
         as_json, _lines)


def _lines(res: dict):
    """The result for people."""
    yield (f"model {res['model']} ({res['pipeline']}) on {res['device']} {res['precision']}, "
           f"{res['resolution']}px, "
           f"{res['steps']} steps, threads={res['threads']}, median of {res['repeats']}")
    pm = res["peak_mb"]
    yield from table([("case", 22), ("wall s", 10), ("cpu s", 10), ("peak MB", 10)],
                     [(name, f"{s:.3f}", f"{res['cpu_seconds'][name]:.3f}",
                       f"{pm[name]:.0f}" if pm[name] is not None else "-")
                      for name, s in res["seconds"].items()])
    cpu = res.get("ratios_cpu_time", {})
    best = res.get("ratios_cpu_time_best", {})
    yield f"{'ratio':<30}{'wall':>7}{'cpu':>8}{'cpu best':>10}" if cpu else "ratios (wall time):"
    for name, r in res["ratios"].items():
        yield f"  {name:<28}{r:>7.3f}" + (f"{cpu[name]:>8.3f}{best[name]:>10.3f}" if cpu else "")
    for goal, ok in res["goals"].items():
        yield f"  goal {goal} ({res['goals_basis']}): {'met' if ok else 'NOT met'}"
