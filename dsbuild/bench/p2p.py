"""``dsbuild bench p2p``: P2P pair cost against plain diffusers making the same two images.

Everything runs in one process on one model: plain ``StableDiffusionPipeline`` (stock SDPA
processors) making the source and target images in one batch of two, dsbuild P2P in each mode,
and K targets sharing one source against K separate pairs. Reported as ratios.
"""

from __future__ import annotations

import json
import statistics
import time

import click

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
ARCHS = ("tiny", "small", "sd15")


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, else the process RSS high-water mark."""

    def __init__(self, device: str):
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset VmHWM (Linux)
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            try:
                for line in open("/proc/self/status"):
                    if line.startswith("VmHWM:"):
                        self.peak_mb = int(line.split()[1]) / 1024
            except OSError:
                self.peak_mb = None


def _time_cases(cases: dict, device: str, repeats: int) -> tuple[dict, dict, dict]:
    """Median wall and CPU seconds and peak MB per case; repeats go round-robin."""
    import torch

    for fn in cases.values():  # warm-up (allocator, kernels, caches)
        fn()
    times: dict[str, list[float]] = {n: [] for n in cases}
    cpu: dict[str, list[float]] = {n: [] for n in cases}
    peaks: dict[str, float | None] = dict.fromkeys(cases)
    for _ in range(repeats):
        for name, fn in cases.items():
            with PeakMemory(device) as pm:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            if pm.peak_mb is not None:
                peaks[name] = max(peaks[name] or 0.0, pm.peak_mb)
    med = statistics.median
    return ({n: med(t) for n, t in times.items()}, {n: med(t) for n, t in cpu.items()}, peaks)


def run_bench(model: str | None = None, arch: str = "tiny", steps: int = 8, size: int = 64,
              k: int = 8, dtype: str = "fp32", device: str = "auto", repeats: int = 2,
              threads: int | None = None) -> dict:
    """Time plain vs P2P pairs; returns figures and ratios (no assertions)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dsbuild.generate.generators.p2p.sampler import P2PGenerator, SourceGroup, TargetSpec, make_scheduler
    from dsbuild.models import load_sd_pipeline, resolve_device

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    pipe = load_sd_pipeline(model or ("tiny" if arch == "tiny" else f"arch:{arch}"), dtype, dev,
                            quiet=True)
    label = model or f"arch:{arch} (random weights)"
    sched_name = "euler_ancestral"
    gen = P2PGenerator(pipe, sched_name)
    p2p_procs = dict(pipe.unet.attn_processors)
    seed, g = 0, 7.5

    def plain_pair():
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.scheduler = make_scheduler(sched_name, pipe.scheduler.config)
        try:
            gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
            pipe([SRC, TARGETS["self"]["prompt"]], num_inference_steps=steps, guidance_scale=g,
                 height=size, width=size, generator=gens, output_type="np")
        finally:
            pipe.unet.set_attn_processor(dict(p2p_procs))  # it pops from the dict

    def p2p(targets: list[dict], batch: int | None = None):
        def run():
            gen.generate([SourceGroup(SRC, seed, g, [TargetSpec(**t) for t in targets])], steps,
                         size, size, batch_size=batch or len(targets) + 1)
        return run

    variants = [dict(TARGETS["self"], self_replace=0.1 + 0.8 * i / max(1, k - 1))
                for i in range(k)]
    cases = {"plain_pair": plain_pair, **{f"p2p_{m}": p2p([t]) for m, t in TARGETS.items()},
             f"p2p_shared_k{k}": p2p(variants)}
    seconds, cpu_seconds, peaks = _time_cases(cases, dev, repeats)
    out = {"model": label, "device": dev, "dtype": dtype, "steps": steps, "size": size,
           "k": k, "threads": torch.get_num_threads(), "repeats": repeats,
           "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peaks}
    out["ratios"] = _ratios(out["seconds"], k)
    if dev == "cpu":  # process CPU time: robust to other processes sharing the cores
        out["ratios_cpu_time"] = _ratios(out["cpu_seconds"], k)
    basis = out.get("ratios_cpu_time", out["ratios"])
    out["goals_basis"] = "cpu time" if "ratios_cpu_time" in out else "wall time"
    out["goals"] = {
        "self/plain <= 1.10": basis["self/plain"] <= 1.10,
        "replace/plain <= 1.10": basis["replace/plain"] <= 1.10,
        f"shared_k{k} <= 0.60 x {k} pairs": basis[f"shared_k{k}/{k}_separate"] <= 0.60,
    }
    for key in ("seconds", "cpu_seconds"):
        out[key] = {k_: round(v, 4) for k_, v in out[key].items()}
    out["peak_mb"] = {k_: (round(v, 1) if v is not None else None)
                      for k_, v in out["peak_mb"].items()}
    return out


def _ratios(sec: dict, k: int) -> dict:
    plain = sec["plain_pair"]
    r = {f"{m}/plain": round(sec[f"p2p_{m}"] / plain, 3) for m in TARGETS}
    r[f"shared_k{k}/{k}_separate"] = round(sec[f"p2p_shared_k{k}"] / (k * sec["p2p_self"]), 3)
    return r


@click.command("p2p")
@click.option("--model", default=None, help="diffusers SD dir or Hub id (default: --arch)")
@click.option("--arch", type=click.Choice(ARCHS), default="tiny", show_default=True,
              help="random-weight model built from config (sd15 = SD 1.5 shapes)")
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--size", type=int, default=64, show_default=True, help="image height and width")
@click.option("--k", type=int, default=8, show_default=True, help="targets sharing a source")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def bench_p2p(model, arch, steps, size, k, dtype, device, repeats, threads, as_json):
    """Time per pair and peak memory: plain diffusers vs dsbuild P2P in each mode."""
    res = run_bench(model, arch, steps, size, k, dtype, device, repeats, threads)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"model {res['model']} on {res['device']} {res['dtype']}, {res['size']}px, "
               f"{res['steps']} steps, threads={res['threads']}, median of {res['repeats']}")
    click.echo(f"{'case':<22}{'wall s':>10}{'cpu s':>10}{'peak MB':>10}")
    for name, s in res["seconds"].items():
        pm, cs = res["peak_mb"][name], res["cpu_seconds"][name]
        click.echo(f"{name:<22}{s:>10.3f}{cs:>10.3f}"
                   f"{(f'{pm:.0f}' if pm is not None else '-'):>10}")
    cpu = res.get("ratios_cpu_time", {})
    click.echo(f"{'ratio':<30}{'wall':>7}{'cpu':>8}" if cpu else "ratios (wall time):")
    for name, r in res["ratios"].items():
        click.echo(f"  {name:<28}{r:>7.3f}" + (f"{cpu[name]:>8.3f}" if cpu else ""))
    for goal, ok in res["goals"].items():
        click.echo(f"  goal {goal} ({res['goals_basis']}): {'met' if ok else 'NOT met'}")
