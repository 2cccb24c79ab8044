"""Specialise a Stable Diffusion generator to the user's photos: ``dsbuild train-generator``.

DreamBooth (Ruiz et al. 2023, as diffusers' ``train_dreambooth.py`` runs it): every photo is
trained on "a photo of TOKEN CLASS" (or its own caption from ``captions.jsonl``: context
tuning), and the class prior is kept by class images the base model generates once for "a
photo of CLASS" (cached, reused by later runs), trained on beside the photos with weight λ:
``loss = MSE(photos) + λ·MSE(class images)``. ``--method dreambooth`` trains every UNet
weight and saves a full pipeline; ``--method lora`` trains peft adapters and saves them small with a
marker naming the base, which ``generate`` merges on load (:mod:`dsbuild.models.lora`).

The loop (accumulation, checkpoints, exact ``--resume``, progress, validation) is
:mod:`dsbuild.train.loop`, shared with ``dsbuild train``; this module is the objective.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsbuild import __version__
from dsbuild.core.deps import check
from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.records import write_image, write_json
from dsbuild.train.generator_settings import GeneratorTrainSettings
from dsbuild.train.loop import (
    MODEL_TMP,
    TrainState,
    accelerate_precision,
    begin_run,
    checkpoint_last,
    encode_text,
    finished,
    make_optimizer,
    noised,
    output_folder,
    prepare_out,
    publish_model,
    run_loop,
    writing,
)
from dsbuild.train.loop import (
    weight_dtype as frozen_dtype,
)

CONFIG_FILE = "generator_config.json"  # what the finished generator was trained with
CAPTIONS = "captions.jsonl"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LORA_TARGETS = {"unet": ["to_k", "to_q", "to_v", "to_out.0"],
                "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}


@dataclass
class Photo:
    """One training photo (RGB) and the prompt it is trained on."""

    path: Path
    image: object
    prompt: str


@dataclass
class GeneratorResult:
    out: Path
    steps: int
    resumed_from: int | None
    photos: int
    class_images: int
    losses: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    finished: bool = False  # --resume latest found the generator already trained: nothing done


def read_captions(folder: Path) -> dict[str, str]:
    """``captions.jsonl``: one ``{"file": NAME, "caption": TEXT}`` a line (file relative to
    the folder); empty when there is none."""
    path = folder / CAPTIONS
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name, caption = rec["file"], rec["caption"]
        except (ValueError, KeyError, TypeError):
            raise DsbuildError(f"{path} line {n}: expected {{\"file\": ..., \"caption\": ...}}"
                               ) from None
        if not isinstance(caption, str) or not caption.strip():
            raise DsbuildError(f"{path} line {n}: empty caption for {name}")
        out[str(name)] = caption.strip()
    return out


def read_photos(folder: str | Path, resolution: int, prompt: str) -> list[Photo]:
    """Every photo of ``folder``, decoded and checked before any step: readable, at least
    ``resolution`` on the shorter side, and captioned where a ``captions.jsonl`` exists."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DsbuildError(f"PHOTOS {folder}: not a folder; give a folder of photos")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DsbuildError(f"PHOTOS {folder}: no photos ({', '.join(EXTENSIONS)}); put the "
                           "subject's or context's photos there")
    captions = read_captions(folder)
    unknown = sorted(set(captions) - {p.name for p in files})
    if unknown:
        raise DsbuildError(f"{folder / CAPTIONS}: captions for files that are not photos here: "
                           f"{', '.join(unknown[:5])}")
    photos = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                rgb = im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise DsbuildError(f"{p}: unreadable image ({type(exc).__name__}); fix or remove "
                               "it") from None
        if min(rgb.size) < resolution:
            raise DsbuildError(f"{p}: {rgb.size[0]}×{rgb.size[1]} is too small for --resolution "
                               f"{resolution} (shorter side must be ≥ {resolution}); use larger "
                               "photos or a lower --resolution")
        if captions and p.name not in captions:
            raise DsbuildError(f"{p}: no caption in {folder / CAPTIONS}; caption every photo "
                               "or remove the file")
        photos.append(Photo(p, rgb, captions.get(p.name, prompt)))
    return photos


def prompt_note(s: GeneratorTrainSettings, photos: list[Photo]) -> str:
    """One line: what the photos train on, and whether (and how) the class prior is kept."""
    prompts = sorted({p.prompt for p in photos})
    said = (f"prompt {prompts[0]!r}" if len(prompts) == 1
            else f"{len(prompts)} prompts from {CAPTIONS}")
    if s.prior_prompt:
        prior = (f"prior preservation on: {s.num_class_images} class images of "
                 f"{s.prior_prompt!r}, weight {s.prior_loss_weight}")
    elif not s.class_noun:
        prior = ("prior preservation is off without --class (add --class NOUN, e.g. --class "
                 "armchair, to keep the class prior)")
    elif not s.prior_preservation:
        prior = "prior preservation is off (--no-prior-preservation)"
    else:
        prior = "prior preservation is off (--prior-loss-weight 0)"
    return f"train-generator: {said}; {prior}"


def token_warning(tokenizer, token: str) -> str | None:
    """A warning when the identifier is one common vocabulary word: its prior meaning gets
    overwritten (DreamBooth picks rare tokens). BPE vocabularies list frequent merges first, so
    a whole-word token in the first two thirds of the vocabulary counts as common."""
    pieces = tokenizer.tokenize(token)
    if len(pieces) != 1:
        return None
    tid = tokenizer.convert_tokens_to_ids(pieces[0])
    if tid is None or tid >= 2 * len(tokenizer) / 3:
        return None
    return (f"warning: --token {token!r} is a common word of the tokenizer's vocabulary (id "
            f"{tid} of {len(tokenizer)}); training overwrites what it meant. Prefer a rare "
            "token such as 'sks'")


def load_generator_base(base: str) -> dict:
    """UNet, VAE, text encoder, tokenizer and scheduler config of an SD 1.x/2.x text-to-image
    base ('tiny': dsbuild's tiny random model). An 8-channel (InstructPix2Pix) UNet is refused."""
    from dsbuild.models import sd

    if base == "tiny":
        comps = sd.tiny_sd_components()
        comps["scheduler_config"] = dict(comps.pop("scheduler").config)
        sd.warn_tiny()
        return comps
    comps = sd.load_sd_components(base, "--base")
    if comps["unet"].config.in_channels != 4:
        raise DsbuildError(f"--base: {base!r} has a {comps['unet'].config.in_channels}-channel "
                           "UNet (an InstructPix2Pix editor?); train-generator needs a "
                           "text-to-image SD 1.x/2.x checkpoint (4 channels)")
    return comps


def class_dir(s: GeneratorTrainSettings, prompt: str) -> Path:
    """Where this base's class images for ``prompt`` at this size are cached."""
    if s.class_dir:
        return Path(s.class_dir)
    import os

    root = Path(os.environ.get("DSBUILD_CACHE") or Path.home() / ".cache" / "dsbuild")
    base = str(Path(s.base).resolve()) if Path(s.base).exists() else s.base
    key = content_id(base, prompt, s.resolution, s.class_steps, s.seed, length=12)
    return root / "class-images" / key


def sd_pipeline(comps: dict, unet=None, text_encoder=None):
    """A StableDiffusionPipeline over these modules (the base's own DDIM-like sampler)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=comps["vae"], text_encoder=text_encoder or comps["text_encoder"],
        tokenizer=comps["tokenizer"], unet=unet or comps["unet"],
        scheduler=DPMSolverMultistepScheduler.from_config(comps["scheduler_config"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def class_images(comps: dict, s: GeneratorTrainSettings, prompt: str, device, quiet: bool):
    """The prior's class images: generated by the base once (seed + i each) and cached; a
    cache with more images than asked is reused, never regenerated."""
    import torch
    from PIL import Image

    from dsbuild.core.progress import progress

    folder = class_dir(s, prompt)
    paths = [folder / f"{i:05d}.png" for i in range(s.num_class_images)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        pipe = sd_pipeline(comps).to(device)
        with progress(total=len(paths), initial=len(paths) - len(todo), desc="class images",
                      unit="image") as bar:
            for i in todo:
                with torch.no_grad():
                    im = pipe(prompt, height=s.resolution, width=s.resolution,
                              num_inference_steps=s.class_steps,
                              generator=torch.Generator().manual_seed(s.seed + i)).images[0]
                write_image(paths[i], im)
                bar.update(1)
        write_json(folder / "class.json", {"base": s.base, "prompt": prompt,
                                           "resolution": s.resolution, "steps": s.class_steps})
    elif not quiet:
        print(f"class images: {len(paths)} reused from {folder}", file=sys.stderr)
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


class PosteriorCache:
    """Each image's VAE posterior (mean, std) for both flips, encoded once before the loop."""

    def __init__(self, images, vae, resolution: int, flips: bool, device, dtype, batch: int = 8,
                 desc: str = "cache latents"):
        import torch

        from dsbuild.core.progress import progress
        from dsbuild.train.trainer import images_tensor

        self.flips = flips
        mean, std = [], []
        ways = (False, True) if flips else (False,)
        with torch.no_grad(), progress(total=len(images) * len(ways), desc=desc,
                                       unit="image") as bar:
            for flip in ways:
                m_, s_ = [], []
                for i in range(0, len(images), batch):
                    x = images_tensor(images[i:i + batch], resolution, flip)
                    d = vae.encode(x.to(device, dtype)).latent_dist
                    m_.append(d.mean.cpu())
                    s_.append(d.std.cpu())
                    bar.update(len(x))
                mean.append(torch.cat(m_))
                std.append(torch.cat(s_))
        self.mean, self.std = torch.stack(mean), torch.stack(std)

    def sample(self, idx, flip, generator):
        """A posterior sample (unscaled) of images ``idx``, ``flip`` per image."""
        import torch

        way = flip.long() if self.flips else flip.long() * 0
        mean, std = self.mean[way, idx], self.std[way, idx]
        return mean + std * torch.randn(mean.shape, generator=generator)


def train_generator(s: GeneratorTrainSettings, out: str | Path, resume: str | None = None,
                    quiet: bool = False) -> GeneratorResult:
    """Fine-tune ``s.base`` on the photos in ``s.photos``; write a generator to ``out`` (locked
    for the run: :func:`dsbuild.train.loop.output_folder`)."""
    check("train", what="dsbuild train-generator")
    out = Path(out)
    with output_folder(out, "train-generator"):
        return _train_generator(s, out, resume, quiet)


def _train_generator(s: GeneratorTrainSettings, out: Path, resume: str | None,
                     quiet: bool) -> GeneratorResult:
    start_from = prepare_out(out, s, resume, "train-generator", CONFIG_FILE)
    if resume == "latest" and (done := finished(out, s, CONFIG_FILE)):
        return GeneratorResult(out, done["steps"], done["steps"], done["photos"],
                               done["class_images"], finished=True)
    photos = read_photos(s.photos, s.resolution, s.prompt)
    if not quiet:
        print(prompt_note(s, photos), file=sys.stderr)
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    cpu = s.device == "cpu" or (s.device == "auto" and not torch.cuda.is_available())
    try:
        acc = Accelerator(mixed_precision=accelerate_precision(s.precision), cpu=cpu,
                          gradient_accumulation_steps=s.gradient_accumulation)
    except (ValueError, RuntimeError) as exc:
        raise DsbuildError(f"--precision {s.precision}: {exc}") from None
    set_seed(s.seed)
    comps = load_generator_base(s.base)
    unet, vae, text_encoder, tok = (comps["unet"], comps["vae"], comps["text_encoder"],
                                    comps["tokenizer"])
    warnings = []
    if any(s.token in p.prompt.split() for p in photos):
        w = token_warning(tok, s.token)
        if w:
            warnings.append(w)
            print(w, file=sys.stderr)
    prior_prompt = s.prior_prompt
    dev = acc.device
    priors = class_images(comps, s, prior_prompt, dev, quiet) if prior_prompt else []
    noise_sched = DDPMScheduler.from_config(comps["scheduler_config"])
    vae.requires_grad_(False)
    text_encoder.requires_grad_(s.train_text_encoder and s.method == "dreambooth")
    if s.method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha,
                                    init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS["unet"]))
        if s.train_text_encoder:
            text_encoder.requires_grad_(False)
            text_encoder.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha,
                                                init_lora_weights="gaussian",
                                                target_modules=LORA_TARGETS["text_encoder"]))
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trained = [unet, *([text_encoder] if s.train_text_encoder else [])]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(s, params, s.lr)
    world, rank = acc.num_processes, acc.process_index
    n = len(photos)
    micro_per_epoch = math.ceil(n / (s.batch_size * world))
    max_steps = s.max_steps or s.epochs * math.ceil(micro_per_epoch / s.gradient_accumulation)
    lr_sched = get_scheduler(s.lr_scheduler, optimizer=opt,
                             num_warmup_steps=s.lr_warmup_steps * world,
                             num_training_steps=max_steps * world)
    state = TrainState(s.seed + 7919 * rank)
    acc.register_for_checkpointing(state)
    prepared = acc.prepare(*trained, opt, lr_sched)
    trained, opt, lr_sched = list(prepared[:-2]), prepared[-2], prepared[-1]
    unet = trained[0]
    if s.train_text_encoder:
        text_encoder = trained[1]
    weight_dtype = frozen_dtype(acc)
    vae.to(dev, dtype=weight_dtype)
    if not s.train_text_encoder:
        text_encoder.to(dev, dtype=weight_dtype)
    resumed = begin_run(acc, s, out, start_from, state)
    photo_cache = PosteriorCache([p.image for p in photos], vae, s.resolution, s.flip, dev,
                                 weight_dtype, desc="cache photo latents")
    prior_cache = PosteriorCache(priors, vae, s.resolution, s.flip, dev, weight_dtype,
                                 desc="cache class latents") if priors else None
    prompts = [p.prompt for p in photos]
    ids = tok(prompts + ([prior_prompt] if priors else []), max_length=tok.model_max_length,
              padding="max_length", truncation=True, return_tensors="pt").input_ids
    frozen_text = None if s.train_text_encoder else \
        encode_text(text_encoder, tok, prompts + ([prior_prompt] if priors else []), dev,
                    weight_dtype).cpu()
    sf = vae.config.scaling_factor

    def batch_indices(micro: int):
        epoch, pos = divmod(micro, micro_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed + epoch))
        start = pos * s.batch_size * world + rank * s.batch_size
        return perm[torch.arange(start, start + s.batch_size) % n]

    def loss_fn(micro: int, g):
        """DreamBooth's objective: the photos' denoising loss plus λ × the class images'."""
        idx = batch_indices(micro)
        b = len(idx)
        rows = idx
        latents = photo_cache.sample(idx, _flips(b, g), g)
        if prior_cache is not None:
            cidx = (torch.arange(b) + (micro * world + rank) * b) % len(priors)
            latents = torch.cat([latents, prior_cache.sample(cidx, _flips(b, g), g)])
            rows = torch.cat([idx, torch.full((b,), n)])
        latents = latents.to(dev, weight_dtype) * sf
        if frozen_text is not None:
            text = frozen_text[rows].to(dev)
        else:
            text = text_encoder(ids[rows].to(dev))[0]
        noisy, t, target = noised(latents, noise_sched, g, dev)
        pred = unet(noisy, t, text.to(noisy.dtype)).sample.float()
        target = target.float()
        loss = F.mse_loss(pred[:b], target[:b])
        if prior_cache is not None:
            loss = loss + s.prior_loss_weight * F.mse_loss(pred[b:], target[b:])
        return loss

    def _flips(b, g):
        return (torch.rand(b, generator=g) < 0.5) if s.flip else torch.zeros(b, dtype=bool)

    def validate_at(step: int) -> None:
        if acc.is_main_process:
            validate(acc, s, comps, unet, text_encoder, validation_prompts(s, photos),
                     out / "validation" / f"step-{step:06d}.png", step=step)

    t0 = time.process_time()
    losses = run_loop(acc, state, s, out, max_steps=max_steps, loss_fn=loss_fn, models=trained,
                      params=params, opt=opt, lr_sched=lr_sched, validate=validate_at,
                      desc="train-generator")
    loop_cpu_s = time.process_time() - t0
    checkpoint_last(acc, out, state, s, losses)
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_generator(acc, s, out, comps, unet, text_encoder, state.step, photos, len(priors),
                       loop_cpu_s)
    acc.end_training()
    return GeneratorResult(out, state.step, resumed, n, len(priors), losses, warnings)


def validation_prompts(s: GeneratorTrainSettings, photos: list[Photo]) -> list[str]:
    """The distinct training prompts (first four) and the class prompt: what grids show."""
    prompts = list(dict.fromkeys(p.prompt for p in photos))[:4]
    return prompts + ([s.prior_prompt] if s.prior_prompt else [])


def validate(acc, s, comps, unet, text_encoder, prompts: list[str], path: Path,
             images_per_prompt: int = 2, step: int | None = None) -> None:
    """A grid: one line per prompt, images at fixed seeds (the column headers), with the
    weights being trained; titled with the base, the identifier and the step."""
    import torch

    from dsbuild.core.grid import image_grid
    from dsbuild.core.schema import public_name

    net, te = acc.unwrap_model(unet), acc.unwrap_model(text_encoder)
    modes = (net.training, te.training)
    net.eval()
    te.eval()
    pipe = sd_pipeline(comps, unet=net, text_encoder=te)
    lines = []
    with torch.no_grad(), acc.autocast():
        for prompt in prompts:
            gens = [torch.Generator().manual_seed(s.seed + i) for i in range(images_per_prompt)]
            ims = pipe([prompt] * images_per_prompt, height=s.resolution, width=s.resolution,
                       num_inference_steps=s.validation_steps, generator=gens).images
            lines.append((prompt, ims))
    net.train(modes[0])
    te.train(modes[1])
    title = (f"{public_name(s.base)} tuned on {s.token!r}"
             + (f", step {step}" if step is not None else ""))
    write_image(path, image_grid(lines, title=title, headers=[
        f"seed {s.seed + i}" for i in range(images_per_prompt)]))


def lora_state(module) -> dict:
    """A module's LoRA weights as peft names them (``path.lora_A.weight``), fp32 on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(module).items()}


def save_generator(acc, s: GeneratorTrainSettings, out: Path, comps: dict, unet, text_encoder,
                   steps: int, photos: list[Photo], n_class: int, loop_cpu_s: float) -> None:
    """The finished generator: a full StableDiffusionPipeline folder (dreambooth) or LoRA
    weights with a marker naming the base (lora) and a model card, saved whole in a temp
    folder and moved in, then ``generator_config.json`` (last: the generator is complete)."""
    import torch
    from safetensors.torch import save_file

    from dsbuild.models.lora import MARKER
    from dsbuild.train.card import write_generator_card

    net, te = acc.unwrap_model(unet), acc.unwrap_model(text_encoder)
    base = str(Path(s.base).resolve()) if Path(s.base).exists() else s.base
    stage = out / MODEL_TMP
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    fix = "free space, then rerun with --resume latest (the last step is checkpointed)"
    if s.method == "lora":
        with writing(out, fix, remove=stage):
            save_file(lora_state(net), str(stage / "unet_lora.safetensors"))
            if s.train_text_encoder:
                save_file(lora_state(te), str(stage / "text_encoder_lora.safetensors"))
            write_json(stage / MARKER, {"kind": "lora", "base": base,
                                        "scale": s.lora_alpha / s.lora_rank,
                                        "rank": s.lora_rank, "text_encoder": s.train_text_encoder})
    else:
        for module in (net, te, comps["vae"]):  # saved in fp32 whatever the training precision
            if module.dtype != torch.float32:
                module.to(dtype=torch.float32)
        pipe = sd_pipeline(comps, unet=net, text_encoder=te)
        with writing(out, fix, remove=stage):
            pipe.save_pretrained(str(stage))
    config = {"settings": s.model_dump(mode="json"), "base": base, "steps": steps,
              "photos": len(photos), "class_images": n_class,
              "prompts": sorted({p.prompt for p in photos}), "prior_prompt": s.prior_prompt,
              "loop_cpu_s": round(loop_cpu_s, 3), "dsbuild_version": __version__}
    with writing(out, fix, remove=stage):
        write_generator_card(stage, config)
    publish_model(stage, out)
    write_json(out / CONFIG_FILE, config)
