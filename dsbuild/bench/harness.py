"""The one bench harness: a device and torch threads, timed cases (process CPU time and wall
time, warm-up, repeats), peak memory, ratios against the plain library in the same run, and
the shared printing (a table, or the whole result as JSON with ``--json``).

Every bench is one module that builds its cases and its result dict from these pieces. CPU
time (``time.process_time``, the whole process) with one torch thread measures work, not
parallelism, and is robust to other jobs on the cores; on CUDA the clock is wall time after a
synchronize. Benches whose subject *is* overlap (filter's and verify's decode thread pools,
scale's worker processes) time wall seconds and say so.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import click

from dsbuild.core.deprecation import renamed_option
from dsbuild.core.settings import PRECISIONS

ARCHS = ("tiny", "small", "sd15")
PROMPTS = ("make the sofa blue", "add a rug", "remove the lamp", "make the walls white",
           "replace the chair with a stool", "add a plant")

json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")
device_option = click.option("--device", default="auto", show_default=True)


def resolution_option(default: int, help: str = "image side, pixels", old: str = "--size"):
    """--resolution (the image side), and ``old``, its name before one vocabulary."""
    def decorate(fn):
        fn = click.option("--resolution", type=int, default=default, show_default=True,
                          help=help)(fn)
        return renamed_option(old, "--resolution", "resolution", type=int)(fn)
    return decorate


def precision_option(choices=PRECISIONS, default: str = "auto",
                     help: str = "autocast precision (auto: fp16 on CUDA, fp32 on CPU)",
                     old: str | None = "--dtype"):
    """--precision, and ``old``, its name before one vocabulary (None: it had none)."""
    def decorate(fn):
        fn = click.option("--precision", type=click.Choice(choices), default=default,
                          show_default=True, help=help)(fn)
        if old is None:
            return fn
        return renamed_option(old, "--precision", "precision", type=click.Choice(choices))(fn)
    return decorate


# filter's and verify's scoring path: autocast precision and decode threads, best of N runs
autocast_option = precision_option()
decode_workers_option = click.option("--workers", type=int, default=4, show_default=True,
                                     help="dsbuild decode/preprocess threads")
best_of_option = click.option("--repeats", type=int, default=3, show_default=True,
                              help="best of N runs")


def setup(device: str = "auto", threads: int | None = None) -> str:
    """Set torch's CPU threads (when given) and resolve ``device`` ('auto': CUDA if present)."""
    import torch

    from dsbuild.models import resolve_device

    if threads:
        torch.set_num_threads(threads)
    return resolve_device(device)


def torch_threads() -> int:
    """The torch CPU threads this run uses (every result reports it)."""
    import torch

    return torch.get_num_threads()


def on_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    """Wait for queued CUDA work, so a clock read after it covers the work."""
    if on_cuda(device):
        import torch

        torch.cuda.synchronize()


def clock_of(device) -> str:
    """'wall' on CUDA (the work runs on the GPU), 'cpu' (process CPU time) otherwise."""
    return "wall" if on_cuda(device) else "cpu"


def timer_label(device) -> str:
    """How a result names its clock: 'wall seconds' or 'cpu seconds'."""
    return f"{clock_of(device)} seconds"


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, else the process RSS high-water mark."""

    def __init__(self, device: str):
        self.device = str(device)
        self.peak_mb: float | None = None

    def __enter__(self):
        if on_cuda(self.device):
            import torch

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
        if on_cuda(self.device):
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = _proc_status_mb("VmHWM:")


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory now (Linux), MB; 0 where /proc is missing."""
    return _proc_status_mb("VmRSS:") or 0.0


def trim() -> None:
    """Give freed memory back to the OS, so the next side's RSS peak starts clean."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Timings:
    """Per case: every repeat's wall and CPU seconds, and the largest peak memory seen."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    peak_mb: dict[str, float | None]

    def seconds(self, clock: str = "cpu", pick: str = "median") -> dict[str, float]:
        """One figure per case on ``clock`` ('cpu' or 'wall'): the median or the best repeat."""
        runs = self.cpu if clock == "cpu" else self.wall
        reduce = statistics.median if pick == "median" else min
        return {name: reduce(ts) for name, ts in runs.items()}


def time_cases(cases: dict[str, Callable[[], object]], device, repeats: int = 1, *,
               warmup: bool | Callable[[], object] = True, alternate: bool = False,
               memory: bool = False, before: Callable[[], object] | None = None) -> Timings:
    """Run every case ``repeats`` times round-robin, timing each call (synchronized on CUDA).

    ``warmup``: True runs every case once untimed first (allocator, kernels, caches); a
    callable is run instead; False skips it. ``alternate`` reverses the order every repeat, so
    no side always runs first. ``memory`` records each case's peak (:class:`PeakMemory`);
    ``before`` runs untimed before each call (e.g. :func:`trim`)."""
    if warmup is True:
        for fn in cases.values():
            fn()
    elif callable(warmup):
        warmup()
    sync(device)
    wall: dict[str, list[float]] = {n: [] for n in cases}
    cpu: dict[str, list[float]] = {n: [] for n in cases}
    peaks: dict[str, float | None] = dict.fromkeys(cases)
    order = list(cases)
    for _ in range(max(1, repeats)):
        for name in order:
            if before is not None:
                before()
            with PeakMemory(device) if memory else nullcontext() as pm:
                w0, c0 = time.perf_counter(), time.process_time()
                cases[name]()
                sync(device)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
            if pm is not None and pm.peak_mb is not None:
                peaks[name] = max(peaks[name] or 0.0, pm.peak_mb)
        if alternate:
            order.reverse()
    return Timings(wall, cpu, peaks)


def ratio(a: float, b: float, digits: int = 3) -> float:
    """``a / b`` rounded: how every bench states dsbuild against the plain library."""
    return round(a / b, digits)


def per_second(count: int, seconds: dict[str, float], digits: int = 3) -> dict[str, float]:
    """Items per second of each case that did ``count`` items."""
    return {k: round(count / v, digits) for k, v in seconds.items()}


def rounded(values: dict[str, float | None], digits: int) -> dict[str, float | None]:
    return {k: None if v is None else round(v, digits) for k, v in values.items()}


def verdict(value: float, goal: float) -> str:
    """'meets' when a higher-is-better ratio reaches its goal, else 'below'."""
    return "meets" if value >= goal else "below"


def table(columns: Iterable[tuple[str, int]], rows: Iterable[Iterable[str]]) -> list[str]:
    """Fixed-width lines: the first column left-aligned, the others right-aligned."""
    cols = list(columns)

    def line(cells) -> str:
        return "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                       for i, (c, (_, w)) in enumerate(zip(cells, cols, strict=True)))

    return [line([name for name, _ in cols])] + [line(list(r)) for r in rows]


def emit(result: dict, as_json: bool, lines: Callable[[dict], Iterable[str]]) -> None:
    """Print the result: the whole dict as JSON, or the bench's human lines."""
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for text in lines(result):
        click.echo(text)


def images(n: int, size: int, seed: int):
    """``n`` blocky random RGB images (8-pixel blocks: PNG-sized like photos), reproducible."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        out.append(Image.fromarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))))
    return out


def sd_components(arch: str) -> dict:
    """Random-weight Stable Diffusion components of ``arch`` (tiny, small or sd15 shapes)."""
    from dsbuild.models import sd

    return {"tiny": sd.tiny_sd_components, "small": sd.small_sd_components,
            "sd15": sd.sd15_components}[arch]()


def random_editor(arch: str, device: str):
    """An InstructPix2Pix pipeline of ``arch`` shapes with random weights (8-channel UNet)."""
    from dsbuild.models.editor import editor_pipeline
    from dsbuild.train.model import widen_conv_in

    comps = sd_components(arch)
    widen_conv_in(comps["unet"])
    sched = comps.pop("scheduler")
    return editor_pipeline(scheduler_config=dict(sched.config), **comps).to(device)
