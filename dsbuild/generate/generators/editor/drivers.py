"""How each editing pipeline is driven: a source encoded once, its variants edited in a batch.

``IP2PDriver`` (InstructPix2Pix) and ``KontextDriver`` (FLUX.1 Kontext) run the pipeline's own
denoising loop on its own components (prompt encoding, VAE, scheduler, latent packing), with
one CPU generator per row and a per-row guidance tensor, so variants with different seeds and
knobs share one batch and each row is what the pipeline makes for that seed and those knobs.
The source's latents are computed once (``encode``) and each instruction's embeddings once
(cached). ``CallDriver`` (SDXL InstructPix2Pix, Qwen-Image-Edit) calls the pipeline itself,
one edit per call: those pipelines take one guidance value per call and encode the image and
prompt inside the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from dsbuild.core.errors import DsbuildError

CACHE = 4096  # cached instruction embeddings before the cache is cleared


@dataclass
class Job:
    """One edit: the encoded source, the instruction, the seed and the knobs."""

    source: Any  # what the driver's encode() returned
    prompt: str
    seed: int
    guidance: float
    image_guidance: float | None = None


def to_pil(image: np.ndarray) -> Image.Image:
    """A float H x W x 3 image in [0, 1] (already on the 1/255 grid) as an RGB PIL image."""
    return Image.fromarray((image * 255).round().clip(0, 255).astype("uint8"))


def _generators(jobs: list[Job]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(j.seed)) for j in jobs]


class _Embeds:
    """Prompt embeddings, each distinct prompt encoded once (cleared past CACHE prompts)."""

    def __init__(self, encode):
        self._encode, self._cache, self.encoded = encode, {}, 0

    def __call__(self, prompts: list[str]) -> list:
        if len(self._cache) > CACHE:
            self._cache.clear()
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                self._cache[p] = self._encode(p)
                self.encoded += 1
        return [self._cache[p] for p in prompts]


def _check_size(height: int, width: int, multiple: int, pipeline: str) -> None:
    if height % multiple or width % multiple:
        raise DsbuildError(f"generate.height/width must be multiples of {multiple} for this "
                           f"{pipeline} (got {height}x{width})")


class IP2PDriver:
    """StableDiffusionInstructPix2PixPipeline: rows [text, image, uncond] x variants, the
    pipeline's guidance formula with per-row text and image guidance; the first step's equal
    UNet rows are computed once (:func:`first_step_rows`)."""

    batched = True

    def __init__(self, pipe):
        self.pipe = pipe
        self.embeds = _Embeds(self._encode_prompt)

    @property
    def encoded(self) -> int:
        return self.embeds.encoded

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        p = self.pipe
        return p._encode_prompt([prompt], p._execution_device, 1, False)[0]

    @torch.no_grad()
    def encode(self, image: np.ndarray, height: int, width: int) -> torch.Tensor:
        """The source's image latents (the VAE's mode, as the pipeline takes them)."""
        p = self.pipe
        _check_size(height, width, p.vae_scale_factor * 2 ** (len(p.unet.down_blocks) - 1),
                    type(p).__name__)
        x = p.image_processor.preprocess(to_pil(image))
        return p.prepare_image_latents(x, 1, 1, p.unet.dtype, p._execution_device, False)

    @torch.no_grad()
    def edit(self, jobs: list[Job], steps: int, height: int, width: int) -> list[np.ndarray]:
        from diffusers.utils.torch_utils import randn_tensor

        p = self.pipe
        dev, dt, n = p._execution_device, p.unet.dtype, len(jobs)
        text = torch.stack(self.embeds([j.prompt for j in jobs]))
        neg = self.embeds([""])[0].expand(n, -1, -1)
        emb = torch.cat([text, neg, neg]).to(dt)
        img = torch.cat([j.source for j in jobs])
        img = torch.cat([img, img, torch.zeros_like(img)])
        gens = _generators(jobs)
        sched = type(p.scheduler).from_config(p.scheduler.config)
        sched.set_timesteps(steps, device=dev)
        shape = (n, p.vae.config.latent_channels, *img.shape[-2:])
        latents = randn_tensor(shape, generator=gens, device=dev, dtype=dt) * sched.init_noise_sigma
        g = torch.tensor([j.guidance for j in jobs], device=dev, dtype=dt)[:, None, None, None]
        ig = torch.tensor([j.image_guidance for j in jobs], device=dev,
                          dtype=dt)[:, None, None, None]
        extra = _step_kwargs(sched, gens)
        sel, back = first_step_rows(jobs)
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(torch.cat([latents] * 3), t)
            x, e = torch.cat([x, img], dim=1), emb
            if i == 0 and len(sel) < 3 * n:  # equal rows computed once
                eps = p.unet(x[sel], t, encoder_hidden_states=e[sel], return_dict=False)[0]
                eps = eps[back]
            else:
                eps = p.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
            e_text, e_image, e_uncond = eps.chunk(3)
            eps = e_uncond + g * (e_text - e_image) + ig * (e_image - e_uncond)
            latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
        out = p.vae.decode(latents / p.vae.config.scaling_factor, return_dict=False)[0]
        return list(p.image_processor.postprocess(out, output_type="np",
                                                  do_denormalize=[True] * n))


def first_step_rows(jobs: list[Job]) -> tuple[list[int], list[int]]:
    """The distinct rows of an InstructPix2Pix batch's first UNet call, and where each of its
    3n rows [text, image, uncond] finds its result. Before the first step the latents are
    the seed's noise and guidance acts only after the UNet, so a text row is fixed by (source,
    instruction, seed), an image row by (source, seed), an unconditional row (no text, no
    image) by the seed: variants of one source, and edits sharing a source, share them."""
    keys = (lambda j: (id(j.source), j.prompt, j.seed), lambda j: (id(j.source), j.seed),
            lambda j: (j.seed,))
    sel: list[int] = []
    back: list[int] = []
    n = len(jobs)
    for part, key in enumerate(keys):
        seen: dict[tuple, int] = {}
        for r, j in enumerate(jobs):
            k = key(j)
            if k not in seen:
                seen[k] = len(sel)
                sel.append(part * n + r)
            back.append(seen[k])
    return sel, back


class KontextDriver:
    """FluxKontextPipeline: the source's packed latents appended to each row's sequence, a
    per-row embedded guidance (guidance-distilled transformer), the pipeline's sigmas."""

    batched = True

    def __init__(self, pipe):
        self.pipe = pipe
        if not pipe.transformer.config.guidance_embeds:
            raise DsbuildError("generate.model: this FluxKontextPipeline's transformer has no "
                               "guidance embedding (not guidance-distilled); give a Kontext "
                               "model such as black-forest-labs/FLUX.1-Kontext-dev")
        self.embeds = _Embeds(self._encode_prompt)

    @property
    def encoded(self) -> int:
        return self.embeds.encoded

    def _encode_prompt(self, prompt: str):
        p = self.pipe
        pe, pooled, text_ids = p.encode_prompt(prompt=[prompt], prompt_2=None,
                                               device=p._execution_device)
        return pe[0], pooled[0], text_ids

    @torch.no_grad()
    def encode(self, image: np.ndarray, height: int, width: int) -> torch.Tensor:
        """The source's VAE latents (shifted and scaled, not yet packed), as the pipeline
        makes them from the image without its auto-resize."""
        p = self.pipe
        m = p.vae_scale_factor * 2
        _check_size(height, width, m, type(p).__name__)
        pil = to_pil(image)
        h, w = p.image_processor.get_default_height_width(pil)
        h, w = h // m * m, w // m * m
        x = p.image_processor.preprocess(p.image_processor.resize(pil, h, w), h, w)
        return p._encode_vae_image(x.to(p._execution_device, p.transformer.dtype), None)

    @torch.no_grad()
    def edit(self, jobs: list[Job], steps: int, height: int, width: int) -> list[np.ndarray]:
        from diffusers.pipelines.flux.pipeline_flux_kontext import (
            calculate_shift,
            retrieve_timesteps,
        )

        p = self.pipe
        dev, n = p._execution_device, len(jobs)
        enc = self.embeds([j.prompt for j in jobs])
        pe = torch.stack([e[0] for e in enc])
        pooled = torch.stack([e[1] for e in enc])
        text_ids = enc[0][2]
        gens = _generators(jobs)
        latents, image_latents, latent_ids, image_ids = p.prepare_latents(
            torch.cat([j.source for j in jobs]), n, p.transformer.config.in_channels // 4,
            height, width, pe.dtype, dev, gens)
        latent_ids = torch.cat([latent_ids, image_ids], dim=0)
        sched = type(p.scheduler).from_config(p.scheduler.config)
        cfg = sched.config
        mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / steps, steps)
        timesteps, _ = retrieve_timesteps(sched, steps, dev, sigmas=sigmas, mu=mu)
        guidance = torch.tensor([j.guidance for j in jobs], device=dev, dtype=torch.float32)
        sched.set_begin_index(0)
        for t in timesteps:
            x = torch.cat([latents, image_latents], dim=1)
            noise = p.transformer(hidden_states=x, timestep=t.expand(n).to(latents.dtype) / 1000,
                                  guidance=guidance, pooled_projections=pooled,
                                  encoder_hidden_states=pe, txt_ids=text_ids, img_ids=latent_ids,
                                  joint_attention_kwargs={}, return_dict=False)[0]
            latents = sched.step(noise[:, : latents.size(1)], t, latents, return_dict=False)[0]
        latents = p._unpack_latents(latents, height, width, p.vae_scale_factor)
        latents = latents / p.vae.config.scaling_factor + p.vae.config.shift_factor
        out = p.vae.decode(latents, return_dict=False)[0]
        return list(p.image_processor.postprocess(out, output_type="np"))


class CallDriver:
    """Any other editing pipeline: one pipeline call per edit with its PIL source (the
    pipeline encodes image and prompt itself; it takes one guidance value per call)."""

    batched = False
    encoded = 0

    def __init__(self, pipe, family: str):
        self.pipe, self.family = pipe, family

    def encode(self, image: np.ndarray, height: int, width: int) -> Image.Image:
        return to_pil(image)

    @torch.no_grad()
    def edit(self, jobs: list[Job], steps: int, height: int, width: int) -> list[np.ndarray]:
        out = []
        for j in jobs:
            kw: dict = {"image": j.source, "prompt": j.prompt, "num_inference_steps": steps,
                        "generator": torch.Generator("cpu").manual_seed(int(j.seed)),
                        "output_type": "np"}
            if self.family == "qwen":  # true CFG needs a negative prompt (diffusers' example)
                kw.update(true_cfg_scale=j.guidance, negative_prompt=" ", height=height,
                          width=width)
            else:
                kw.update(guidance_scale=j.guidance)
                if j.image_guidance is not None:
                    kw["image_guidance_scale"] = j.image_guidance
                if self.family == "sdxl-ip2p":
                    kw.update(height=height, width=width)
                if self.family == "kontext":  # the generate size, not Kontext's auto-resize
                    kw.update(height=height, width=width, max_area=height * width,
                              _auto_resize=False)
            out.append(self.pipe(**kw).images[0])
        return out


def _step_kwargs(sched, gens) -> dict:
    """``generator`` (and eta 0) where the scheduler's step takes them, as the pipeline does."""
    import inspect

    params = inspect.signature(sched.step).parameters
    kw: dict = {}
    if "eta" in params:
        kw["eta"] = 0.0
    if "generator" in params:
        kw["generator"] = gens
    return kw


def driver_for(pipe, family: str, batched: bool = True):
    """The driver of a loaded pipeline of ``family`` (see settings.KNOBS)."""
    if batched and family == "ip2p":
        return IP2PDriver(pipe)
    if batched and family == "kontext":
        return KontextDriver(pipe)
    return CallDriver(pipe, family)
