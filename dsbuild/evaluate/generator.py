"""``dsbuild eval-generator``: a tuned generator against its base, side by side.

Measured as DreamBooth (Ruiz et al. 2023) measures subject fidelity and prompt fidelity, with
the filter stage's encoders and :mod:`dsbuild.core.metrics`, so the formulas are the ones filter and
``eval`` use:

- **CLIP-T**: cosine of CLIP image and text embeddings of each image with its context prompt
  (the identifier token replaced by the class noun, which CLIP knows; the token alone dropped).
- **CLIP-I / DINO to photos**: mean cosine between each generated image and each training photo.
- **Language drift**: class-prompt images of each model against the *base's* own class images
  at the same seeds (CLIP-I and DINO, mean of the pairs): 1 for the base by definition; the
  lower the tuned model's, the more the class drifted towards the subject.

Images go under ``OUT/images/<model>-<signature>/`` (signature: prompts, seeds, steps,
guidance, size), so a re-run reuses them and a changed setting never mixes stale ones.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from dsbuild.core.deps import check
from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.progress import progress
from dsbuild.core.records import write_image, write_json, write_text
from dsbuild.evaluate.settings import EvalSettings, GeneratorEvalSettings


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/"))[-60:] or "model"


def read_config(tuned: str | Path) -> dict:
    """``generator_config.json`` of a ``dsbuild train-generator`` output folder."""
    from dsbuild.train.generator import CONFIG_FILE

    path = Path(tuned) / CONFIG_FILE
    if not path.is_file():
        raise DsbuildError(f"{tuned}: no {CONFIG_FILE}; eval-generator takes a folder written "
                           "by `dsbuild train-generator`")
    return json.loads(path.read_text())


def clip_text(prompt: str, token: str, class_noun: str | None) -> str:
    """The prompt CLIP scores: the identifier replaced by the class noun (or dropped)."""
    words = prompt.split()
    if class_noun and f"{token} {class_noun}" in prompt:
        return prompt.replace(f"{token} {class_noun}", class_noun)
    return " ".join(class_noun if w == token and class_noun else w for w in words
                    if w != token or class_noun)


def sample(pipe, prompts: list[str], folder: Path, s: GeneratorEvalSettings, size: int,
           desc: str) -> dict[tuple[int, int], Path]:
    """Images ``(prompt i, seed j)`` under ``folder``, generating only the missing ones."""
    import torch

    paths = {(i, j): folder / f"p{i:02d}_{j:02d}.png" for i in range(len(prompts))
             for j in range(s.images_per_prompt)}
    todo = [k for k, p in paths.items() if not p.exists()]
    if todo:
        with progress(total=len(paths), initial=len(paths) - len(todo), desc=desc,
                      unit="image") as bar:
            for i, j in todo:
                with torch.no_grad():
                    im = pipe(prompts[i], height=size, width=size,
                              num_inference_steps=s.steps, guidance_scale=s.guidance,
                              generator=torch.Generator().manual_seed(s.seed + j)).images[0]
                write_image(paths[i, j], im)
                bar.update(1)
    return paths


def evaluate_generator(tuned: str, out: str | Path, s: GeneratorEvalSettings | None = None,
                       base: str | None = None) -> dict:
    """Sample base and tuned on the context and class prompts, score, write eval.json/md and a
    grid under ``out``; the tuned folder's card gets the table. OUT is locked for the run."""
    check("train", what="dsbuild eval-generator")
    from dsbuild.train.loop import lock_out

    out = Path(out)
    with lock_out(out, "eval-generator"):
        return _evaluate_generator(tuned, out, s or GeneratorEvalSettings(), base)


def _evaluate_generator(tuned: str, out: Path, s: GeneratorEvalSettings,
                        base: str | None) -> dict:
    import torch

    from dsbuild.core import metrics
    from dsbuild.core.grid import image_grid
    from dsbuild.evaluate.run import load_encoders
    from dsbuild.models import ImageEmbedder, load_sd_pipeline, resolve_device
    from dsbuild.train.generator import EXTENSIONS

    config = read_config(tuned)
    ts = config["settings"]
    base = base or config["base"]
    size = s.resolution or ts["resolution"]
    photos = sorted(p for p in Path(ts["photos"]).iterdir() if p.suffix.lower() in EXTENSIONS) \
        if Path(ts["photos"]).is_dir() else []
    if not photos:
        raise DsbuildError(f"{tuned}: its training photos {ts['photos']} are gone; eval-generator "
                           "compares with them")
    context = list(dict.fromkeys([*config["prompts"], *s.prompts]))
    class_prompt = config.get("prior_prompt") or (
        f"a photo of {ts['class_noun']}" if ts.get("class_noun") else None)
    prompts = context + ([class_prompt] if class_prompt else [])
    backbones = EvalSettings(clip_model=s.clip_model, clip_pretrained=s.clip_pretrained,
                             clip_preprocess=s.clip_preprocess, dino_model=s.dino_model,
                             device=s.device)
    default = GeneratorEvalSettings()
    chosen = (s.clip_model, s.clip_pretrained, s.dino_model) != \
        (default.clip_model, default.clip_pretrained, default.dino_model)
    if base == "tiny" and not chosen:
        print("note: this generator is tuned from dsbuild's tiny placeholder model; scoring "
              "with the tiny CLIP/DINOv2 backbones too (placeholder scores). Pass "
              "--clip-model/--dino-model to choose others.", file=sys.stderr)
        backbones = backbones.model_copy(update=dict(clip_model="tiny", clip_pretrained="none",
                                                     dino_model="tiny"))
    device = resolve_device(s.device)
    sig = content_id(prompts, s.images_per_prompt, s.steps, s.guidance, s.seed, size,
                     length=10)
    models = {"base": base, "tuned": str(tuned)}
    images: dict[str, dict] = {}
    for label, model in models.items():
        pipe = load_sd_pipeline(model, "fp32", device, quiet=True)
        folder = out / "images" / f"{label}-{_slug(model)}-{sig}"
        images[label] = sample(pipe, prompts, folder, s, size, f"sample {label}")
        del pipe
    clip, dino = load_encoders(backbones)
    embedder = ImageEmbedder({"clip": clip, "dino": dino})
    every = [*photos, *(p for d in images.values() for p in d.values())]
    emb, errors = embedder.embed(every)
    if errors:
        p, (kind, detail) = next(iter(errors.items()))
        raise DsbuildError(f"{p}: {kind} {detail}; delete it and run eval-generator again")
    texts = [clip_text(p, ts["token"], ts.get("class_noun")) for p in context]
    text_emb = clip.encode_text(texts)
    photo = {k: torch.stack([emb[p][k] for p in photos]) for k in ("clip", "dino")}
    n_ctx = len(context)
    result: dict = {
        "tuned": str(tuned), "base": base, "photos": len(photos), "context_prompts": context,
        "clip_prompts": texts, "class_prompt": class_prompt,
        "backbones": {"clip": f"{backbones.clip_model}/{backbones.clip_pretrained}",
                      "dino": backbones.dino_model,
                      "clip_preprocess": backbones.clip_preprocess},
        "settings": {**s.model_dump(mode="json"), "resolution": size}, "scale": "cosine", "models": {},
    }
    for label in models:
        ctx = [(i, images[label][i, j]) for i in range(n_ctx)
               for j in range(s.images_per_prompt)]
        img = {k: torch.stack([emb[p][k] for _, p in ctx]) for k in ("clip", "dino")}
        vals = {
            "clip_t": metrics.clip_text_image(img["clip"], text_emb[[i for i, _ in ctx]]),
            "clip_i_photos": metrics.cosine(img["clip"][:, None], photo["clip"][None]).flatten(),
            "dino_photos": metrics.cosine(img["dino"][:, None], photo["dino"][None]).flatten(),
        }
        if class_prompt:
            mine = [images[label][n_ctx, j] for j in range(s.images_per_prompt)]
            ref = [images["base"][n_ctx, j] for j in range(s.images_per_prompt)]
            for k, name in (("clip", "drift_clip_i"), ("dino", "drift_dino")):
                vals[name] = metrics.cosine(torch.stack([emb[p][k] for p in mine]),
                                            torch.stack([emb[p][k] for p in ref]))
        result["models"][label] = {"model": models[label], **metrics.mean_metrics(vals)}
    md = markdown(result)
    write_json(out / "eval.json", result)
    write_text(out / "eval.md", md)
    from dsbuild.core.schema import public_name

    lines = [(prompts[i], [_open(images[label][i, j]) for label in models
                           for j in range(s.images_per_prompt)]) for i in range(len(prompts))]
    headers = [f"{label}, seed {s.seed + j}" for label in models
               for j in range(s.images_per_prompt)]
    title = (f"base {public_name(base)} | tuned {public_name(str(tuned))}: {s.steps} steps, "
             f"guidance {s.guidance}")
    write_image(out / "grid.png", image_grid(lines, title=title, headers=headers))
    if Path(tuned).is_dir():
        from dsbuild.train.card import update_eval

        update_eval(Path(tuned), md)
    return result


# (key in the JSON, column title, what it measures); the table puts models in rows, as eval's
COLUMNS = [("clip_t", "CLIP-T ↑", "image vs context prompt"),
           ("clip_i_photos", "CLIP-I photos ↑", "CLIP-I to the training photos"),
           ("dino_photos", "DINO photos ↑", "DINO to the training photos"),
           ("drift_clip_i", "prior CLIP-I ↑", "class prior: CLIP-I to the base's class images"),
           ("drift_dino", "prior DINO ↑", "class prior: DINO to the base's class images")]


def markdown(result: dict) -> str:
    """Base and tuned in rows, the metrics in columns (cosines ×100), as ``eval`` prints."""
    from dsbuild.core.schema import public_name
    from dsbuild.evaluate.report import IP2P_NOTE

    m = result["models"]
    cols = [c for c in COLUMNS if c[0] in m["tuned"]]
    lines = [f"Base **{public_name(m['base']['model'])}** vs tuned "
             f"**{public_name(m['tuned']['model'])}**, {result['photos']} training photos, "
             f"{result['settings']['images_per_prompt']} images per prompt; backbones CLIP "
             f"{result['backbones']['clip']}"
             f"{IP2P_NOTE if result['backbones'].get('clip_preprocess') == 'ip2p' else ''}, "
             f"DINO {result['backbones']['dino']} (cosine ×100).",
             "", "| model | " + " | ".join(t for _, t, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label in ("base", "tuned"):
        lines.append(f"| {label} ({public_name(m[label]['model'])}) | "
                     + " | ".join(f"{100 * m[label][k]:.2f}" for k, _, _ in cols) + " |")
    lines += [""] + [f"- {t.rstrip(' ↑')} ({what})" for _, t, what in cols]
    return "\n".join(lines) + "\n"


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
