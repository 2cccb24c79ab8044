"""The model card (README.md) of a trained editor: dataset, base, steps, settings, and the eval
table once ``dsbuild eval`` has run on the model (it rewrites the marked section)."""

from __future__ import annotations

from pathlib import Path

from dsbuild.core.exports import pushed_to
from dsbuild.core.records import write_text
from dsbuild.core.schema import public_name
from dsbuild.train.generator_settings import GeneratorTrainSettings
from dsbuild.train.settings import TrainSettings

EVAL_START, EVAL_END = "<!-- dsbuild-eval -->", "<!-- /dsbuild-eval -->"
NO_EVAL = "Not evaluated yet: run `dsbuild eval BASE THIS_FOLDER --data DATA`."


def dataset_ref(data: str) -> dict:
    """What a model card names as its training data: ``hub_id`` (a Hub dataset id: the data
    itself, or the repo an export folder was pushed to, as its export_info.json records) and
    ``text`` (the prose: the id, else the folder's absolute path, which is reusable here)."""
    path = Path(data)
    if path.is_dir():
        where = str(path.resolve())
        pushed = pushed_to(path)
        if pushed:
            return {"hub_id": pushed["repo_id"], "path": where,
                    "text": f"the Hub dataset **{pushed['repo_id']}** (pushed from the local "
                            f"export `{where}`)"}
        return {"hub_id": None, "path": where,
                "text": f"the local export `{where}` (not pushed to the Hub)"}
    if data.count("/") == 1 and not data.startswith((".", "/", "~")):
        return {"hub_id": data, "path": None, "text": f"the Hub dataset **{data}**"}
    return {"hub_id": None, "path": data, "text": f"`{data}`"}


def card_text(config: dict, eval_md: str | None = None) -> str:
    s = TrainSettings.upgrade(config["settings"])  # a folder trained before a rename
    base = public_name(s["base"])
    ref = config.get("dataset") or dataset_ref(str(s["data"]))
    meta = ["---", "library_name: diffusers", "pipeline_tag: image-to-image",
            "tags: [instruct-pix2pix, image-editing, dsbuild]"]
    if base and base != "tiny" and not str(base).startswith("local:"):
        meta.append(f"base_model: {base}")
    if ref["hub_id"]:  # only a Hub id belongs in `datasets:`; a folder is named in the prose
        meta.append(f"datasets: [{ref['hub_id']}]")
    meta.append("---")
    how = {"widened": "SD UNet widened to 8 input channels (new channels zero, weights and "
                      "bias kept)",
           "as is": "an InstructPix2Pix checkpoint, used as it is",
           "tiny": "dsbuild's tiny random model (a test placeholder, not an editor)"}
    settings = "\n".join(f"| {k} | {v} |" for k, v in s.items() if k != "device")
    body = f"""
# InstructPix2Pix fine-tuned with dsbuild

An instruction-based image editor (`StableDiffusionInstructPix2PixPipeline`), fine-tuned with
`dsbuild train` on {ref['text']} (split `{s['split']}`, {config['rows']} rows).

- Base: **{base}** — {how.get(config['base_kind'], config['base_kind'])}
- Method: {s['method']}{f" (rank {s['lora_rank']}, fused into the UNet)" if s['method'] == 'lora' else ''}
- Optimizer steps: {config['steps']} at batch {s['batch_size']} × accumulation
  {s['gradient_accumulation']}, resolution {s['resolution']}, precision {s['precision']}
- Weights: {'the EMA (decay ' + str(s['ema_decay']) + ')' if s['ema'] else 'the last step'}

```python
from diffusers import StableDiffusionInstructPix2PixPipeline
pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained("THIS_FOLDER")
edited = pipe("make the sofa blue", image=image, image_guidance_scale=1.5).images[0]
```

## Evaluation

{EVAL_START}
{eval_md or NO_EVAL}
{EVAL_END}

## Training settings

| setting | value |
|---|---|
{settings}

Trained with dsbuild {config.get('dsbuild_version', '')}; the full settings are in
`train_config.json`.
"""
    return "\n".join(meta) + "\n" + body


def write_card(out: Path, config: dict, eval_md: str | None = None) -> None:
    write_text(Path(out) / "README.md", card_text(config, eval_md))


def update_eval(folder: Path, eval_md: str) -> bool:
    """Put an eval table into a trained model's card; False when the folder has no card."""
    card = Path(folder) / "README.md"
    if not card.exists():
        return False
    text = card.read_text()
    if EVAL_START not in text or EVAL_END not in text:
        return False
    head, rest = text.split(EVAL_START, 1)
    _, tail = rest.split(EVAL_END, 1)
    write_text(card, f"{head}{EVAL_START}\n{eval_md}\n{EVAL_END}{tail}")
    return True


GENERATOR_NO_EVAL = ("Not evaluated yet: run `dsbuild eval-generator THIS_FOLDER` (CLIP-T, "
                     "CLIP-I/DINO to the photos, language drift, base vs tuned).")


def generator_card_text(config: dict, eval_md: str | None = None) -> str:
    """The card of a ``dsbuild train-generator`` model (full pipeline or LoRA on its base)."""
    s = GeneratorTrainSettings.upgrade(config["settings"])  # a folder trained before a rename
    base = public_name(config["base"])
    lora = s["method"] == "lora"
    meta = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
            f"tags: [dreambooth, {'lora, ' if lora else ''}stable-diffusion, dsbuild]"]
    if base and base != "tiny" and not str(base).startswith("local:"):
        meta.append(f"base_model: {base}")
    meta.append("---")
    if lora:
        use = ("LoRA weights (`unet_lora.safetensors`, peft names) on the base named in "
               "`dsbuild-generator.json`; `generate.model=THIS_FOLDER` merges them on load.")
    else:
        use = "A full `StableDiffusionPipeline` folder; `generate.model=THIS_FOLDER` loads it."
    prior = (f"prior preservation: {config['class_images']} class images for "
             f"\"{config['prior_prompt']}\", λ = {s['prior_loss_weight']}"
             if config.get("prior_prompt") else "no prior preservation")
    prompts = "\n".join(f"- `{p}`" for p in config["prompts"][:10])
    settings = "\n".join(f"| {k} | {v} |" for k, v in s.items() if k != "device")
    body = f"""
# A Stable Diffusion generator tuned with dsbuild

Fine-tuned with `dsbuild train-generator --method {s['method']}` on {config['photos']} photos
({prior}; text encoder {'trained' if s['train_text_encoder'] else 'frozen'}).

- Base: **{base}**
- {use}
- Optimizer steps: {config['steps']} at batch {s['batch_size']}, resolution {s['resolution']},
  precision {s['precision']}

Training prompts:
{prompts}

## Evaluation

{EVAL_START}
{eval_md or GENERATOR_NO_EVAL}
{EVAL_END}

## Training settings

| setting | value |
|---|---|
{settings}

Trained with dsbuild {config.get('dsbuild_version', '')}; the full settings are in
`generator_config.json`.
"""
    return "\n".join(meta) + "\n" + body


def write_generator_card(out: Path, config: dict, eval_md: str | None = None) -> None:
    write_text(Path(out) / "README.md", generator_card_text(config, eval_md))
