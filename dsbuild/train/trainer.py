"""Fine-tune InstructPix2Pix on edit rows: the loop behind ``dsbuild train``.

The step is InstructPix2Pix's (Brooks et al. 2023, as diffusers' example script runs it):
noise the edited image's latents (a sample of the VAE posterior, × scaling factor), concatenate
the input image's latents (the posterior mode, unscaled), condition on the instruction, MSE
on the noise (or v). Conditioning dropout with probability p each: text only, both, image
only (u < 2p drops the text; p ≤ u < 3p drops the image).

What differs is where the time goes: with ``cache_latents`` (and centre crops) each row's
posterior (mean, std) is encoded once per flip and each distinct instruction once, so a step
samples ``mean + std·ε`` and runs only the UNet. Data order, noise, timesteps, flips and
dropout come from one seeded generator whose state is checkpointed with the model, optimizer,
LR schedule, EMA and the data position (accelerate ``save_state`` / ``register_for_checkpointing``),
so a run killed and resumed with ``--resume latest`` ends with the weights of one that was not.
The loop itself (accumulation, checkpoints, resume, validation, progress) is
:mod:`dsbuild.train.loop`, shared with ``dsbuild train-generator``; this module is the objective.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsbuild import __version__
from dsbuild.core.deps import check
from dsbuild.core.errors import DsbuildError
from dsbuild.core.progress import progress
from dsbuild.core.records import write_json
from dsbuild.train import data as rows_mod
from dsbuild.train.loop import (  # noqa: F401 - KILL_ENV, RUN_FILE: the trainer's public names
    KILL_ENV,
    MODEL_TMP,
    RUN_FILE,
    TrainState,
    accelerate_precision,
    begin_run,
    checkpoint_last,
    checkpoints,
    ema_weights,
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
from dsbuild.train.settings import TrainSettings

CONFIG_FILE = "train_config.json"  # what the finished model was trained with

@dataclass
class TrainResult:
    out: Path
    steps: int
    resumed_from: int | None
    rows: int
    base_kind: str
    losses: list[float] = field(default_factory=list)
    cache_cpu_s: float = 0.0  # CPU seconds encoding latents and prompts once (0 if not cached)
    loop_cpu_s: float = 0.0  # CPU seconds of the training steps
    finished: bool = False  # --resume latest found the model already trained: nothing done


class LatentCache:
    """Each row's posterior (mean, std) of the edited image and mode of the input image, for
    both flips, and each distinct instruction's text embedding (and the empty one), encoded once."""

    def __init__(self, rows, vae, text_encoder, tokenizer, resolution: int, flips: bool,
                 device, dtype, batch: int = 8):
        import torch

        self.flips = flips
        prompts = sorted({r.edit_prompt for r in rows} | {""})
        self.prompt_index = {p: i for i, p in enumerate(prompts)}
        self.row_prompt = torch.tensor([self.prompt_index[r.edit_prompt] for r in rows])
        self.text = encode_text(text_encoder, tokenizer, prompts, device, dtype).cpu()
        self.null = self.prompt_index[""]
        ways = (False, True) if flips else (False,)
        mean, std, cond = [], [], []
        # minutes at 256 px on a CPU before the first step: a bar says so
        with torch.no_grad(), progress(total=len(rows) * len(ways), desc="cache latents",
                                       unit="row") as bar:
            for flip in ways:
                m_, s_, c_ = [], [], []
                for i in range(0, len(rows), batch):
                    chunk = rows[i:i + batch]
                    src = images_tensor([r.input_image for r in chunk], resolution, flip)
                    dst = images_tensor([r.edited_image for r in chunk], resolution, flip)
                    d = vae.encode(dst.to(device, dtype)).latent_dist
                    m_.append(d.mean.cpu())
                    s_.append(d.std.cpu())
                    c_.append(vae.encode(src.to(device, dtype)).latent_dist.mode().cpu())
                    bar.update(len(chunk))
                mean.append(torch.cat(m_))
                std.append(torch.cat(s_))
                cond.append(torch.cat(c_))
        self.mean, self.std, self.cond = torch.stack(mean), torch.stack(std), torch.stack(cond)

    def batch(self, idx, flip):
        """(posterior mean, std, input latents, text embeddings) of rows ``idx``."""
        way = flip.long() if self.flips else flip.long() * 0
        return (self.mean[way, idx], self.std[way, idx], self.cond[way, idx],
                self.text[self.row_prompt[idx]])


def images_tensor(images, resolution: int, flip, crops=None, scale: float = 1.0):
    """PIL images fitted to ``resolution`` (crop at ``crops[i]`` or centred), flipped where
    ``flip`` (a bool, or one bool per image), as a tensor in [-1, 1]."""
    from PIL import Image

    out = []
    for i, im in enumerate(images):
        im = rows_mod.fit(im, resolution, None if crops is None else crops[i], scale)
        f = flip if isinstance(flip, bool) else bool(flip[i])
        out.append(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else im)
    return rows_mod.to_tensor(out)


def conditioning_dropout(u, p: float, text, null_text, image_latents):
    """InstructPix2Pix's dropout from one uniform draw per row: u < 2p drops the text,
    p ≤ u < 3p drops the image (so p each: text only, both, image only)."""
    import torch

    if p <= 0:
        return text, image_latents
    drop_text = (u < 2 * p).reshape(-1, 1, 1)
    text = torch.where(drop_text, null_text.to(text.dtype), text)
    keep_image = 1 - ((u >= p) & (u < 3 * p)).to(image_latents.dtype)
    return text, image_latents * keep_image.reshape(-1, 1, 1, 1)


def train(s: TrainSettings, out: str | Path, resume: str | None = None,
          quiet: bool = False) -> TrainResult:
    """Fine-tune ``s.base`` on ``s.data``; write a pipeline folder to ``out`` (locked for the
    run: :func:`dsbuild.train.loop.output_folder`)."""
    check("train", what="dsbuild train")
    out = Path(out)
    with output_folder(out, "train"):
        return _train(s, out, resume)


def _train(s: TrainSettings, out: Path, resume: str | None) -> TrainResult:
    start_from = prepare_out(out, s, resume, "train", CONFIG_FILE)
    if resume == "latest" and (done := finished(out, s, CONFIG_FILE)):
        return TrainResult(out, done["steps"], done["steps"], done["rows"], done["base_kind"],
                           finished=True)
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from dsbuild.train import model as model_mod

    ds = rows_mod.load_split(s.data, s.split)
    rows = rows_mod.read_rows(ds, f"{s.data} [{s.split}]")
    cpu = s.device == "cpu" or (s.device == "auto" and not torch.cuda.is_available())
    try:
        acc = Accelerator(mixed_precision=accelerate_precision(s.precision), cpu=cpu,
                          gradient_accumulation_steps=s.gradient_accumulation)
    except (ValueError, RuntimeError) as exc:
        raise DsbuildError(f"--precision {s.precision}: {exc}") from None
    set_seed(s.seed)
    comps, base_kind = model_mod.load_base(s.base)
    unet, vae, text_encoder, tok = (comps["unet"], comps["vae"], comps["text_encoder"],
                                    comps["tokenizer"])
    noise_sched = DDPMScheduler.from_config(comps["scheduler_config"])
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if s.method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha,
                                    init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if base_kind == "widened":  # the new image channels must learn, LoRA cannot reach them
            unet.conv_in.requires_grad_(True)
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = make_optimizer(s, params, s.learning_rate)
    world, rank = acc.num_processes, acc.process_index
    micro_per_epoch = math.ceil(len(rows) / (s.batch_size * world))
    steps_per_epoch = math.ceil(micro_per_epoch / s.gradient_accumulation)
    max_steps = s.max_steps or s.epochs * steps_per_epoch
    lr_sched = get_scheduler(s.lr_scheduler, optimizer=opt,
                             num_warmup_steps=s.lr_warmup_steps * world,
                             num_training_steps=max_steps * world)
    # foreach: one op over all tensors per EMA step, not a Python loop over them
    ema = EMAModel(params, decay=s.ema_decay, foreach=True) if s.ema else None
    state = TrainState(s.seed + 7919 * rank)
    acc.register_for_checkpointing(state, *([ema] if ema else []))
    unet, opt, lr_sched = acc.prepare(unet, opt, lr_sched)
    weight_dtype = frozen_dtype(acc)
    dev = acc.device
    vae.to(dev, dtype=weight_dtype)
    text_encoder.to(dev, dtype=weight_dtype)
    resumed = begin_run(acc, s, out, start_from, state)
    if ema:
        ema.to(dev)
    cached = s.cache_latents and s.crop == "center"
    t_cache = time.process_time()
    scale = 1.125 if s.crop == "random" else 1.0
    if cached:
        cache = LatentCache(rows, vae, text_encoder, tok, s.resolution, s.flip, dev,
                            weight_dtype)
        null_text = cache.text[cache.null].to(dev)
    else:
        null_text = encode_text(text_encoder, tok, [""], dev, weight_dtype)[0]
    sf = vae.config.scaling_factor
    n = len(rows)
    t_loop = time.process_time()

    def batch_indices(micro: int):
        epoch, pos = divmod(micro, micro_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed + epoch))
        start = pos * s.batch_size * world + rank * s.batch_size
        return perm[torch.arange(start, start + s.batch_size) % n]

    def loss_fn(micro: int, g):
        """InstructPix2Pix's objective on one micro-batch (edited latents noised, input
        latents concatenated, conditioning dropout)."""
        idx = batch_indices(micro)
        b = len(idx)
        flip = (torch.rand(b, generator=g) < 0.5) if s.flip else torch.zeros(b, dtype=bool)
        if cached:
            mean, std, cond, text = cache.batch(idx, flip)
            eps = torch.randn(mean.shape, generator=g)
            latents = (mean + std * eps).to(dev, weight_dtype) * sf
            cond, text = cond.to(dev), text.to(dev)
        else:
            crops = None
            if s.crop == "random":
                crops = []
                for i in idx.tolist():
                    rx, ry = rows_mod.crop_range(rows[i].input_image, s.resolution, scale)
                    crops.append((int(torch.randint(rx + 1, (1,), generator=g)),
                                  int(torch.randint(ry + 1, (1,), generator=g))))
            src = images_tensor([rows[i].input_image for i in idx.tolist()],
                                s.resolution, flip, crops, scale).to(dev, weight_dtype)
            dst = images_tensor([rows[i].edited_image for i in idx.tolist()],
                                s.resolution, flip, crops, scale).to(dev, weight_dtype)
            with torch.no_grad():
                post = vae.encode(dst).latent_dist
                eps = torch.randn(post.mean.shape, generator=g)
                latents = (post.mean + post.std * eps.to(dev, post.mean.dtype)) * sf
                cond = vae.encode(src).latent_dist.mode()
                text = encode_text(text_encoder, tok,
                                   [rows[i].edit_prompt for i in idx.tolist()], dev,
                                   weight_dtype)
        noisy, t, target = noised(latents, noise_sched, g, dev)
        u = torch.rand(b, generator=g).to(dev)
        text, cond = conditioning_dropout(u, s.conditioning_dropout, text, null_text, cond)
        pred = unet(torch.cat([noisy, cond.to(noisy.dtype)], dim=1), t, text).sample
        return F.mse_loss(pred.float(), target.float())

    def validate_at(step: int) -> None:
        validate(acc, s, unet, vae, text_encoder, tok, comps["scheduler_config"], ema,
                 params, out / "validation" / f"step-{step:06d}.png", step=step)

    losses = run_loop(acc, state, s, out, max_steps=max_steps, loss_fn=loss_fn, models=[unet],
                      params=params, opt=opt, lr_sched=lr_sched, ema=ema, validate=validate_at)
    t_end = time.process_time()
    checkpoint_last(acc, out, state, s, losses)
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model(acc, s, out, unet, vae, text_encoder, tok, comps["scheduler_config"], ema,
                   params, base_kind, state.step, len(rows))
    acc.end_training()
    return TrainResult(out, state.step, resumed, len(rows), base_kind, losses,
                       t_loop - t_cache if cached else 0.0, t_end - t_loop)


def validation_rows(s: TrainSettings):
    """Fixed rows for validation grids: the first of the test split, else of the train split."""
    for split in ("test", s.split):
        try:
            ds = rows_mod.load_split(s.data, split)
        except DsbuildError:
            continue
        return rows_mod.read_rows(ds, f"{s.data} [{split}]", limit=s.validation_rows)
    return []


def validate(acc, s, unet, vae, text_encoder, tok, sched_cfg, ema, params, path: Path,
             step: int | None = None) -> None:
    """A grid of edits on fixed rows (input | edit | ground truth), with the EMA weights,
    titled with the base, the method, the data and the step."""
    import torch

    from dsbuild.core.grid import edit_grid
    from dsbuild.core.records import write_image
    from dsbuild.core.schema import public_name
    from dsbuild.models.editor import editor_pipeline

    if not acc.is_main_process:
        return
    rows = validation_rows(s)
    net = acc.unwrap_model(unet)
    was_training = net.training
    net.eval()
    with ema_weights(ema, params), torch.no_grad(), acc.autocast():
        pipe = editor_pipeline(net, vae, text_encoder, tok, sched_cfg)
        images = [rows_mod.fit(r.input_image, s.resolution) for r in rows]
        gens = [torch.Generator().manual_seed(s.seed + r.index) for r in rows]
        edits = pipe([r.edit_prompt for r in rows], image=images, generator=gens,
                     num_inference_steps=s.validation_steps, guidance_scale=7.5,
                     image_guidance_scale=1.5).images
    net.train(was_training)
    title = (f"{public_name(s.base)} + {s.method} on {public_name(s.data)}"
             + (f", step {step}" if step is not None else "")
             + (" (EMA weights)" if ema is not None else ""))
    write_image(path, edit_grid([(r.edit_prompt, im, e, rows_mod.fit(r.edited_image,
                                                                      s.resolution))
                                 for r, im, e in zip(rows, images, edits, strict=True)],
                                title=title, headers=["input", "edit (ig=1.5)", "truth"]))


def save_model(acc, s, out: Path, unet, vae, text_encoder, tok, sched_cfg, ema, params,
               base_kind: str, steps: int, n_rows: int) -> None:
    """The finished model: a StableDiffusionInstructPix2PixPipeline folder (EMA weights, LoRA
    fused) and a model card, saved whole in a temp folder and moved in, then
    ``train_config.json`` (last: the model is complete)."""
    import torch

    from dsbuild.models.editor import editor_pipeline
    from dsbuild.train.card import dataset_ref, write_card

    net = acc.unwrap_model(unet)
    if ema:
        ema.copy_to(params)
    stage = out / MODEL_TMP
    shutil.rmtree(stage, ignore_errors=True)
    fix = "free space, then rerun with --resume latest (the last step is checkpointed)"
    if s.method == "lora":
        with writing(out / "unet_lora", fix, remove=stage):
            net.save_lora_adapter(str(stage / "unet_lora"))
        net.fuse_lora()
        net.unload_lora()
    for module in (net, vae, text_encoder):  # saved in fp32 whatever the training precision
        if module.dtype != torch.float32:
            module.to(dtype=torch.float32)
    pipe = editor_pipeline(net, vae, text_encoder, tok, sched_cfg)
    config = {"settings": s.model_dump(mode="json"), "base_kind": base_kind, "steps": steps,
              "rows": n_rows, "dataset": dataset_ref(s.data), "dsbuild_version": __version__}
    with writing(out, fix, remove=stage):
        pipe.save_pretrained(str(stage))
        write_card(stage, config)
    publish_model(stage, out)
    write_json(out / CONFIG_FILE, config)
