"""The P2P sampler: sources and their targets denoised together in one batch.

It reuses the diffusers pipeline's components (text encoding, scheduler, VAE, image
post-processing) and runs the same loop as ``StableDiffusionPipeline`` or, for SDXL,
``StableDiffusionXLPipeline``, with per-row guidance and one generator per row: every row of a
(caption, seed) group gets a generator seeded alike, so source and targets share the initial
noise and each ancestral step's noise, and each row's noise is exactly what the plain pipeline
draws for that seed.

SDXL: both text encoders' penultimate states are concatenated per token, so one token position
means the same word in both, and one alignment (checked: the two tokenizers split each caption
alike) edits both; the added conditioning (time ids from the image size, the second encoder's
pooled embedding) is each row's own, so a target differs from its source only by its caption.
Few-step models (Turbo, LCM, Lightning): a batch whose rows all have guidance <= 1, or a UNet
that embeds the guidance itself (LCM), runs no unconditional branch, as diffusers does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dsbuild.attention.align import (
    Alignment,
    align_prompts,
    max_length,
    prompt_words,
    token_weights,
)
from dsbuild.attention.controller import P2PController, RowEdit
from dsbuild.attention.processors import install
from dsbuild.core.errors import DsbuildError
from dsbuild.core.quiet import count_cut

MODES = ("self", "replace", "refine", "reweight", "auto")


def make_scheduler(name: str, config):
    """A fresh scheduler of the chosen kind from the model's scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
    )

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler_ancestral":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "euler":  # SDXL-Lightning's (with the checkpoint's "trailing" spacing)
        return EulerDiscreteScheduler.from_config(config)
    if name == "lcm":  # LCM-distilled UNets and LCM-LoRA
        return LCMScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    raise DsbuildError(f"generate.scheduler must be one of {', '.join(SCHEDULERS)} "
                       f"(got {name!r})")


SCHEDULERS = ("ddim", "euler_ancestral", "euler", "lcm", "dpmsolver++")


@dataclass
class TargetSpec:
    """One edited image made from a source: its prompt and P2P parameters."""

    prompt: str
    mode: str = "self"  # self | replace | refine | reweight | auto
    self_replace: float = 0.0  # fraction of steps reusing the source's self-attention
    cross_replace: float | dict[str, float] = 0.8  # fraction, or {word: fraction, "default": f}
    equalizer: dict[str, float] | None = None  # target word -> attention scale (reweight)
    blend_words: tuple[list[str], list[str]] | None = None  # (source words, target words)
    guidance: float | None = None  # None: the source's guidance
    # a session node (dsbuild.core.sessions): the index of the group's target whose image
    # this one edits (its parent, listed before it); None: the group's source (the root)
    parent: int | None = None


@dataclass
class SourceGroup:
    """All targets that share one source image (same caption, seed and guidance). A session
    run is one group: its root is the source, its nodes the targets, each node reading its
    parent's row (``TargetSpec.parent``); such a group is run in one batch, whole, even when
    it has more rows than the batch size."""

    prompt: str
    seed: int
    guidance: float
    targets: list[TargetSpec] = field(default_factory=list)
    # a real photo's inversion (invert.py): the start latent x_T [C, h, w] every row of the
    # group starts from, and each step's unconditional embedding [steps, L, D] for its rows
    latents: torch.Tensor | None = None
    uncond: torch.Tensor | None = None


@dataclass
class GroupImages:
    source: np.ndarray  # H x W x 3 float in [0, 1]
    targets: list[np.ndarray]
    modes: list[str]  # resolved mode per target (auto -> replace | refine)
    masks: list[np.ndarray | None] = field(default_factory=list)  # local-blend mask, H x W bool


class P2PGenerator:
    """Prompt-to-Prompt on a diffusers StableDiffusionPipeline via attention processors."""

    def __init__(self, pipe, scheduler: str = "euler_ancestral", blend_threshold: float = 0.3,
                 blend_start: float = 0.2, segmenter=None):
        self.pipe = pipe
        self.scheduler_name = scheduler
        make_scheduler(scheduler, pipe.scheduler.config)  # fail early on a bad name
        self.controller = P2PController(blend_threshold, blend_start)
        install(pipe.unet, self.controller)
        # blend_mask=segment: a segmenter (dsbuild.models.load_segmenter: CLIPSeg, or
        # detector boxes + SAM, each with its own threshold) makes the local-blend mask
        self.segmenter = segmenter
        if segmenter is not None:
            self.controller.segment = self._segment
        self._embeds: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._aligned: dict[tuple[str, str, str], Alignment] = {}
        self._split_checked: set[str] = set()
        self.xl = getattr(pipe, "text_encoder_2", None) is not None  # SDXL's added conditioning
        self.L = max_length(pipe.tokenizer)
        self.encoded = 0
        self.cut = 0  # captions longer than the text encoder's tokens (cut; counted, not logged)

    @property
    def device(self):
        return self.pipe.unet.device

    @property
    def dtype(self):
        return self.pipe.unet.dtype

    # ------------------------------------------------------------------ text
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings, each distinct caption encoded once (cached across batches)."""
        return self.encode_pooled(prompts)[0]

    def encode_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token text embeddings [N, L, D] and, for SDXL, the pooled ones [N, P]."""
        if len(self._embeds) > 4096:  # bound memory; clear before looking up what is missing
            self._embeds.clear()
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if missing:
            out = self.pipe.encode_prompt(missing, device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
            emb, pooled = out[0], (out[2] if self.xl else None)
            self.encoded += len(missing)
            self.cut += count_cut(self.pipe.tokenizer, missing)
            for i, p in enumerate(missing):
                self._embeds[p] = (emb[i], pooled[i] if pooled is not None else None)
        emb = torch.stack([self._embeds[p][0] for p in prompts])
        pooled = torch.stack([self._embeds[p][1] for p in prompts]) if self.xl else None
        return emb, pooled

    def forget_text(self) -> None:
        """Drop the cached text embeddings (a benchmark pair then pays its encoding, as the
        plain pipeline does on every call)."""
        self._embeds.clear()

    def unconditional(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The negative branch's embeddings for ``n`` rows, as the plain pipeline makes them:
        the empty caption's, or zeros for SDXL's force_zeros_for_empty_prompt."""
        emb, pooled = self.encode_pooled([""])
        if self.xl and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            emb, pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
        return emb.expand(n, -1, -1), (pooled.expand(n, -1) if pooled is not None else None)

    # ------------------------------------------------------------------ edits
    def align(self, source: str, target: str, mode: str) -> Alignment:
        """Token alignment of two prompts, computed once per (source, target, mode)."""
        key = (source, target, mode)
        if key not in self._aligned:
            if len(self._aligned) > 4096:
                self._aligned.clear()
            self.check_split(source, target)
            self._aligned[key] = align_prompts(self.pipe.tokenizer, source, target, mode)
        return self._aligned[key]

    def words(self, prompt: str) -> list:
        """The tokenizer's words of a prompt with their token positions."""
        self.check_split(prompt)
        return prompt_words(self.pipe.tokenizer, prompt)[0]

    def check_split(self, *prompts: str) -> None:
        """SDXL: the second tokenizer puts each prompt's text at the same token positions as
        the first (SDXL's two CLIP tokenizers share their vocabulary and merges), so the
        first's alignment and word maps hold for both encoders' tokens."""
        tok2 = getattr(self.pipe, "tokenizer_2", None)
        if tok2 is None:
            return
        if len(self._split_checked) > 4096:
            self._split_checked.clear()
        for p in prompts:
            if p in self._split_checked:
                continue
            # the text's token positions (a fast tokenizer may group punctuation by its
            # special tokens: SDXL's second pads with "!"; positions are what alignment maps)
            one = [t for w in prompt_words(self.pipe.tokenizer, p)[0] for t in w.tokens]
            two = [t for w in prompt_words(tok2, p)[0] for t in w.tokens]
            if one != two:
                raise DsbuildError(f"generate.model: its two tokenizers split {p!r} into "
                                   "different tokens, so P2P cannot align its words on both "
                                   "text encoders; use a checkpoint whose tokenizer_2 matches "
                                   "its tokenizer")
            self._split_checked.add(p)

    def row_edit(self, source_prompt: str, t: TargetSpec, source_row: int) -> tuple[RowEdit, str]:
        """The controller's view of one target; returns it with the resolved mode."""
        if t.mode not in MODES:
            raise DsbuildError(f"P2P mode must be one of {', '.join(MODES)} (got {t.mode!r})")
        L = self.L
        edit = RowEdit(source=source_row, self_replace=float(t.self_replace))
        resolved, al = t.mode, None
        if t.mode != "self":
            al = self.align(source_prompt, t.prompt, "auto" if t.mode == "reweight" else t.mode)
            resolved = al.mode if t.mode == "auto" else t.mode
            edit.alignment = al
            cross = t.cross_replace if isinstance(t.cross_replace, dict) \
                else {"default": t.cross_replace}
            edit.cross_replace = per_token(al.tgt_words, cross, 0.8, L)
            if t.equalizer:
                edit.equalizer = per_token(al.tgt_words, t.equalizer, 1.0, L)
        if t.blend_words is not None:
            src_words = al.src_words if al else self.words(source_prompt)
            tgt_words = al.tgt_words if al else self.words(t.prompt)
            edit.blend_src = token_weights(src_words, t.blend_words[0], L)
            edit.blend_tgt = token_weights(tgt_words, t.blend_words[1], L)
            # segment what the source shows; an add has only target words: look for those
            edit.segment_phrase = " ".join(t.blend_words[0] or t.blend_words[1])
        return edit, resolved

    # ------------------------------------------------------------------ sampling
    def generate(self, groups: list[SourceGroup], steps: int, height: int, width: int,
                 batch_size: int = 8,
                 callback: Callable[[int, torch.Tensor, P2PController, list], None] | None = None,
                 scheduler: str | None = None) -> list[GroupImages]:
        """Images for every group: batches of at most ``batch_size`` images, one source each
        (``scheduler``: another than this sampler's, e.g. ddim for inverted photos)."""
        pieces: list[tuple[int, list[int]]] = []  # (group index, target indices)
        per = max(1, batch_size - 1)
        for gi, g in enumerate(groups):
            idx = list(range(len(g.targets)))
            if chained(g):  # a session run: its rows read each other, so it is never split
                pieces.append((gi, idx))
                continue
            for s in range(0, max(1, len(idx)), per):
                pieces.append((gi, idx[s:s + per]))
        batches: list[list[tuple[int, list[int]]]] = [[]]
        rows = 0
        for p in pieces:
            n = 1 + len(p[1])
            if batches[-1] and rows + n > batch_size:
                batches.append([])
                rows = 0
            batches[-1].append(p)
            rows += n
        src_img: dict[int, np.ndarray] = {}
        tgt_img: dict[tuple[int, int], np.ndarray] = {}
        modes: dict[tuple[int, int], str] = {}
        masks: dict[tuple[int, int], np.ndarray] = {}
        for batch in batches:
            images, layout, resolved, row_masks = self._run_batch(groups, batch, steps, height,
                                                                  width, callback, scheduler)
            for row, ((gi, ti), im) in enumerate(zip(layout, images, strict=True)):
                if ti is None:
                    src_img.setdefault(gi, im)
                else:
                    tgt_img[(gi, ti)] = im
                    if row in row_masks:
                        masks[(gi, ti)] = row_masks[row]
            modes.update(resolved)
        return [GroupImages(src_img[gi], [tgt_img[(gi, ti)] for ti in range(len(g.targets))],
                            [modes[(gi, ti)] for ti in range(len(g.targets))],
                            [masks.get((gi, ti)) for ti in range(len(g.targets))])
                for gi, g in enumerate(groups)]

    @torch.no_grad()
    def _run_batch(self, groups, batch, steps, height, width, callback, scheduler=None):
        from diffusers.utils.torch_utils import randn_tensor

        pipe, ctrl = self.pipe, self.controller
        prompts, seeds, guid, layout = [], [], [], []
        edits: dict[int, RowEdit] = {}
        resolved: dict[tuple[int, int], str] = {}
        for gi, tis in batch:
            g = groups[gi]
            src_row = len(prompts)
            prompts.append(g.prompt)
            seeds.append(g.seed)
            guid.append(g.guidance)
            layout.append((gi, None))
            row_of: dict[int, int] = {}
            for ti in tis:
                t = g.targets[ti]
                row = row_of[ti] = len(prompts)
                if t.parent is None:
                    edits[row], resolved[(gi, ti)] = self.row_edit(g.prompt, t, src_row)
                else:  # a session node: its parent's row is its source
                    if t.parent not in row_of:
                        raise DsbuildError(f"P2P target {ti} names parent {t.parent}, which is "
                                           "not a target listed before it")
                    edits[row], resolved[(gi, ti)] = self.row_edit(
                        g.targets[t.parent].prompt, t, row_of[t.parent])
                prompts.append(t.prompt)
                seeds.append(g.seed)
                guid.append(g.guidance if t.guidance is None else t.guidance)
                layout.append((gi, ti))
        R = len(prompts)
        vsf = pipe.vae_scale_factor
        if height % (vsf * 2 ** (len(pipe.unet.down_blocks) - 1)) or \
                width % (vsf * 2 ** (len(pipe.unet.down_blocks) - 1)):
            raise DsbuildError(f"generate.height/width must be multiples of "
                               f"{vsf * 2 ** (len(pipe.unet.down_blocks) - 1)} for this model "
                               f"(got {height}x{width})")
        dev, dt = self.device, self.dtype
        # LCM-distilled UNets embed the guidance; otherwise rows at guidance <= 1 need no
        # unconditional branch, and a batch of only those runs none (as diffusers)
        time_cond = pipe.unet.config.get("time_cond_proj_dim")
        cfg = time_cond is None and any(x > 1 for x in guid)
        cond, pooled = self.encode_pooled(prompts)
        zero_uncond = False  # SDXL's zeroed negative: its cross-attention output is zero
        if cfg:
            uncond, upooled = self.unconditional(R)
            zero_uncond = not bool(uncond.any())
            ehs = torch.cat([uncond, cond]).to(dt)
            pooled = torch.cat([upooled, pooled]) if pooled is not None else None
        else:
            ehs = cond.to(dt)
        unet_kw = {}
        if self.xl:
            ids = pipe._get_add_time_ids(
                (height, width), (0, 0), (height, width), dtype=dt,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            unet_kw["added_cond_kwargs"] = {"text_embeds": pooled.to(dev, dt),
                                            "time_ids": ids.to(dev).repeat(ehs.shape[0], 1)}
        if time_cond is not None:
            w = torch.tensor(guid, dtype=torch.float32) - 1
            unet_kw["timestep_cond"] = pipe.get_guidance_scale_embedding(
                w, embedding_dim=time_cond).to(dev, dt)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        sched = make_scheduler(scheduler or self.scheduler_name, pipe.scheduler.config)
        sched.set_timesteps(steps, device=dev)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        shape = (R, pipe.unet.config.in_channels, height // vsf, width // vsf)
        latents = randn_tensor(shape, generator=gens, device=dev, dtype=dt)
        latents = latents * sched.init_noise_sigma
        step_uncond = None  # [steps, R, L, D] where an inverted photo's rows have their own
        for row, (gi, _) in enumerate(layout):
            grp = groups[gi]
            if grp.latents is not None:
                latents[row] = grp.latents.to(dev, dt)
            if cfg and grp.uncond is not None:
                if grp.uncond.shape[0] != len(sched.timesteps):
                    raise DsbuildError(f"an inversion of {len(grp.uncond)} steps cannot drive "
                                       f"a run of {len(sched.timesteps)}")
                if step_uncond is None:
                    step_uncond = ehs[:R][None].expand(len(sched.timesteps), -1, -1,
                                                          -1).clone()
                step_uncond[:, row] = grp.uncond.to(dev, dt)
        g = torch.tensor(guid, device=dev, dtype=dt)[:, None, None, None]
        guided = g > 1
        step_kw = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters \
            else {}
        ctrl.configure(R, edits, len(sched.timesteps), dev, dt, cfg=cfg, zero_uncond=zero_uncond)
        try:
            for i, t in enumerate(sched.timesteps):
                ctrl.begin_step(i)
                inp = sched.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
                if step_uncond is not None:
                    ehs = torch.cat([step_uncond[i], ehs[R:]])
                noise = pipe.unet(inp, t, encoder_hidden_states=ehs, return_dict=False,
                                  **unet_kw)[0]
                if cfg:
                    n_u, n_c = noise.chunk(2)
                    noise = torch.where(guided, n_u + g * (n_c - n_u), n_c)
                out = sched.step(noise, t, latents, **step_kw)
                latents = ctrl.after_step(out.prev_sample, i,
                                          getattr(out, "pred_original_sample", None))
                if callback is not None:
                    callback(i, latents, ctrl, layout)
            row_masks = self._final_masks(height, width)
        finally:
            ctrl.reset()
        images = self.decode(latents)
        return list(images), layout, resolved, row_masks

    def _segment(self, x0: torch.Tensor, phrases: list[str]) -> torch.Tensor:
        """blend_mask=segment: each source's phrase segmented in its predicted image, at the
        latents' size (a latent cell is in when at least half its pixels are)."""
        from PIL import Image

        images = self.decode(x0.to(self.dtype))
        masks = [self.segmenter.mask(Image.fromarray((im * 255).round().astype(np.uint8)),
                                     [p] if p else [])
                 for im, p in zip(images, phrases, strict=True)]
        m = torch.from_numpy(np.stack(masks)).float()[:, None]
        m = torch.nn.functional.interpolate(m, size=tuple(x0.shape[-2:]), mode="area")
        return m.ge(0.5).to(x0.device)

    def _final_masks(self, height: int, width: int) -> dict[int, np.ndarray]:
        """The last local-blend mask of each blending row, at image size (nearest upsampling)."""
        ctrl = self.controller
        if ctrl.last_mask is None:
            return {}
        m = torch.nn.functional.interpolate(ctrl.last_mask.float(), size=(height, width))
        m = m[:, 0].gt(0.5).cpu().numpy()
        return {row: m[k] for k, row in enumerate(ctrl.blend_rows)}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> float images [N, H, W, 3] in [0, 1] (each latent decoded once)."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)  # an SDXL VAE kept fp32 under an fp16 UNet
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:  # as StableDiffusionXLPipeline decodes
            shape = (1, latents.shape[1], 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents)
            std = torch.tensor(std).view(shape).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        out = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(out, output_type="np",
                                                     do_denormalize=[True] * out.shape[0])


def chained(group: SourceGroup) -> bool:
    """Whether a group is a session run (some target edits another target)."""
    return any(t.parent is not None for t in group.targets)


def per_token(words, values: dict[str, float], default: float, length: int) -> torch.Tensor:
    """A [L] vector: ``values[word]`` at that word's tokens, ``values["default"]`` (else
    ``default``) elsewhere: per-word cross-replace fractions and reweighting scales."""
    out = torch.full((length,), float(values.get("default", default)))
    for word, v in values.items():
        if word != "default":
            out[token_weights(words, [word], length) > 0] = float(v)
    return out
