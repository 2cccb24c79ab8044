"""``dsbuild bench train``: training steps/s of ``dsbuild train`` against diffusers' own
InstructPix2Pix training loop doing the same work, in one process.

The baseline re-implements the per-step work of diffusers'
``examples/instruct_pix2pix/train_instruct_pix2pix.py``: decode and resize both images, flip
them together, tokenize, VAE-encode the edited image (posterior sample) and the input image
(mode), text-encode the instruction and the empty prompt, conditioning dropout, UNet forward
and backward, clip the gradient norm, AdamW, EMA — every step. dsbuild runs its real
``train()`` on the same rows written as an export, from the same base folder, with the same
batch, resolution, precision, optimiser and EMA. With the latent cache dsbuild encodes each
row (both flips) and each prompt once; the ratio is reported with and without that one-time
cost. Times are CPU seconds (``time.process_time``) with ``threads`` torch threads on CPU,
wall seconds on CUDA; peak memory is the CUDA allocator peak, or the process RSS high-water
mark above the start of each side on CPU.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import click

from dsbuild.bench.harness import (
    ARCHS,
    PROMPTS,
    PeakMemory,
    device_option,
    emit,
    images,
    json_option,
    on_cuda,
    precision_option,
    ratio,
    rounded,
    rss_mb,
    sd_components,
    setup,
    sync,
    torch_threads,
    trim,
    verdict,
)
from dsbuild.core.deprecation import renamed_option


def write_dataset(folder: Path, n: int, size: int) -> Path:
    """``n`` rows as an export folder (``data/train-*.parquet`` with Image columns)."""
    import datasets

    a, b = images(n, size, 0), images(n, size, 1)
    ds = datasets.Dataset.from_dict(
        {"input_image": a, "edit_prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n)],
         "edited_image": b},
        features=datasets.Features({"input_image": datasets.Image(),
                                    "edit_prompt": datasets.Value("string"),
                                    "edited_image": datasets.Image()}))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def write_base(folder: Path, arch: str) -> Path:
    """An SD-shaped base (4-channel UNet, random weights) saved as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**sd_components(arch), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(folder))
    return folder


def diffusers_loop(base: Path, data: Path, resolution: int, batch_size: int, steps: int,
                   lr: float, seed: int, device: str, precision: str) -> dict:
    """diffusers' example training loop's per-step work (see the module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from datasets import load_dataset
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from torchvision import transforms
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    out_ch = unet.conv_in.out_channels
    unet.register_to_config(in_channels=8)
    with torch.no_grad():  # as the script does: a new conv, old weights in, bias re-initialised
        conv = torch.nn.Conv2d(8, out_ch, unet.conv_in.kernel_size, unet.conv_in.stride,
                               unet.conv_in.padding)
        conv.weight.zero_()
        conv.weight[:, :4].copy_(unet.conv_in.weight)
        unet.conv_in = conv
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    ema_unet = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel,
                        model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    files = {"train": [str(p) for p in sorted((data / "data").glob("train-*.parquet"))]}
    dataset = load_dataset("parquet", data_files=files)

    def tokenize_captions(captions):
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                         truncation=True, return_tensors="pt").input_ids

    train_transforms = transforms.Compose([transforms.CenterCrop(resolution),
                                           transforms.RandomHorizontalFlip()])

    def convert_to_np(image, res):
        return np.array(image.convert("RGB").resize((res, res))).transpose(2, 0, 1)

    def preprocess_train(examples):
        orig = np.concatenate([convert_to_np(i, resolution) for i in examples["input_image"]])
        edit = np.concatenate([convert_to_np(i, resolution) for i in examples["edited_image"]])
        images = train_transforms(2 * (torch.tensor(np.concatenate([orig, edit])) / 255) - 1)
        o, e = images.chunk(2)
        examples["original_pixel_values"] = o.reshape(-1, 3, resolution, resolution)
        examples["edited_pixel_values"] = e.reshape(-1, 3, resolution, resolution)
        examples["input_ids"] = tokenize_captions(list(examples["edit_prompt"]))
        return examples

    train_dataset = dataset["train"].with_transform(preprocess_train)

    def collate_fn(examples):
        return {k: torch.stack([x[k] for x in examples]).float() if k != "input_ids"
                else torch.stack([x[k] for x in examples])
                for k in ("original_pixel_values", "edited_pixel_values", "input_ids")}

    loader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn,
                                         batch_size=batch_size)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    unet.to(device)
    ema_unet.to(device)
    text_encoder.to(device, dtype=dtype)
    vae.to(device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    p = 0.05
    amp = (torch.autocast(device_type=torch.device(device).type, dtype=dtype)
           if precision != "fp32" else nullcontext())
    done = 0
    t0 = time.process_time()
    w0 = time.perf_counter()
    unet.train()
    while done < steps:
        for batch in loader:
            with amp:
                latents = vae.encode(batch["edited_pixel_values"].to(device, dtype)
                                     ).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=latents.device).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"].to(device))[0]
                orig = vae.encode(batch["original_pixel_values"].to(device, dtype)
                                  ).latent_dist.mode()
                random_p = torch.rand(bsz, device=latents.device, generator=generator)
                prompt_mask = (random_p < 2 * p).reshape(bsz, 1, 1)
                null = text_encoder(tokenize_captions([""]).to(device))[0]
                hidden = torch.where(prompt_mask, null, hidden)
                image_mask = 1 - ((random_p >= p).to(orig.dtype)
                                  * (random_p < 3 * p).to(orig.dtype))
                orig = image_mask.reshape(bsz, 1, 1, 1) * orig
                pred = unet(torch.cat([noisy, orig], dim=1), timesteps, hidden).sample
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ema_unet.step(unet.parameters())
            done += 1
            if done >= steps:
                break
    sync(device)
    return {"loop_cpu_s": time.process_time() - t0, "loop_wall_s": time.perf_counter() - w0}


def run_bench(arch: str = "small", resolution: int = 64, batch_size: int = 2, rows: int = 8,
              steps: int = 6, precision: str = "fp32", device: str = "auto",
              threads: int | None = 1) -> dict:
    """Train ``steps`` steps both ways on the same rows and base; returns figures and ratios."""
    from dsbuild.train.settings import TrainSettings
    from dsbuild.train.trainer import train

    dev = setup(device, threads)
    with tempfile.TemporaryDirectory(prefix="dsbuild-bench-train-") as tmp:
        tmp = Path(tmp)
        data = write_dataset(tmp / "data", rows, resolution)
        base = write_base(tmp / "base", arch)
        trim()
        start = {"diffusers": rss_mb()}
        with PeakMemory(dev) as pm_base:
            base_res = diffusers_loop(base, data, resolution, batch_size, steps, 5e-5, 0, dev,
                                      precision)
        trim()
        s = TrainSettings(data=str(data), base=str(base), resolution=resolution,
                          batch_size=batch_size, max_steps=steps, checkpoint_every=10**9,
                          precision=precision, device=dev, seed=0)
        w0 = time.perf_counter()
        start["dsbuild"] = rss_mb()
        with PeakMemory(dev) as pm_ours:
            res = train(s, tmp / "out", quiet=True)
        ours_wall = time.perf_counter() - w0
    timer = "wall" if on_cuda(dev) else "cpu"
    base_t = base_res["loop_wall_s"] if timer == "wall" else base_res["loop_cpu_s"]
    ours_loop, ours_cache = res.loop_cpu_s, res.cache_cpu_s
    per_step = {"diffusers": base_t / steps, "dsbuild": ours_loop / steps}
    peaks = {"diffusers": pm_base.peak_mb, "dsbuild": pm_ours.peak_mb}
    if not on_cuda(dev):  # RSS high-water mark above where each side started
        peaks = {k: (v - start[k] if v is not None else None) for k, v in peaks.items()}
    return {
        "arch": arch, "device": dev, "precision": precision,
        "resolution": resolution, "batch_size": batch_size, "rows": rows, "steps": steps,
        "threads": torch_threads(), "timer": f"{timer} seconds"
        + (" (dsbuild side: CPU seconds)" if timer == "wall" else ""),
        "steps_per_s": {k: round(1 / v, 3) for k, v in per_step.items()},
        "dsbuild_cache_s": round(ours_cache, 3),
        "dsbuild_total_wall_s": round(ours_wall, 2),
        "ratio_steps": ratio(per_step["diffusers"], per_step["dsbuild"]),
        "ratio_with_cache": ratio(base_t, ours_loop + ours_cache),
        "peak_mb": rounded(peaks, 1),
        "memory_ratio": (ratio(peaks["dsbuild"], peaks["diffusers"])
                         if peaks["diffusers"] and peaks["dsbuild"] else None),
        "goal": {"ratio_steps": 1.25, "memory_ratio": 1.0},
    }


@click.command("train")
@click.option("--arch", type=click.Choice(ARCHS), default="small", show_default=True,
              help="base shapes (random weights): tiny, small (CPU), sd15 (SD 1.5)")
@click.option("--resolution", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=2, show_default=True)
@click.option("--rows", type=int, default=8, show_default=True, help="dataset rows")
@click.option("--steps", type=int, default=6, show_default=True, help="optimizer steps")
@precision_option(("fp32", "fp16", "bf16"), "fp32", help="fp32, or mixed precision fp16|bf16",
                  old=None)
@renamed_option("--mixed-precision", "--precision", "precision", values={"no": "fp32"},
                type=click.Choice(["no", "fp16", "bf16"]))
@device_option
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads (1: CPU time measures work, not parallelism)")
@json_option
def bench_train(arch, resolution, batch_size, rows, steps, precision, device, threads,
                as_json):
    """Training steps/s of dsbuild train vs diffusers' InstructPix2Pix loop, same run."""
    emit(run_bench(arch, resolution, batch_size, rows, steps, precision, device, threads),
         as_json, _lines)


def _lines(res: dict):
    """The result for people."""
    sps = res["steps_per_s"]
    yield (f"bench train: arch {res['arch']} on {res['device']} ({res['precision']}), "
           f"{res['resolution']}px, batch {res['batch_size']}, {res['rows']} rows, "
           f"{res['steps']} steps, {res['threads']} thread(s), {res['timer']}")
    yield f"  diffusers' loop:        {sps['diffusers']:>8.3f} steps/s"
    yield (f"  dsbuild train (loop):   {sps['dsbuild']:>8.3f} steps/s  "
           f"(+ {res['dsbuild_cache_s']:.2f} s once for the latent/prompt cache)")
    met = verdict(res["ratio_steps"], res["goal"]["ratio_steps"])
    yield (f"  ratio = {res['ratio_steps']:.3f}x ({met} the 1.25x goal); with the cache "
           f"counted over these {res['steps']} steps: {res['ratio_with_cache']:.3f}x")
    pk = res["peak_mb"]
    if res["memory_ratio"] is not None:
        yield (f"  peak memory: diffusers {pk['diffusers']:.0f} MB, dsbuild "
               f"{pk['dsbuild']:.0f} MB, ratio {res['memory_ratio']:.3f}x (goal <= 1.0x)")
