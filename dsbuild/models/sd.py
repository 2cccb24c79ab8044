"""Stable Diffusion: the pipeline loader (``generate``), the component loader (``train``'s
base) and SD components built from config with random weights (no download).

``tiny_sd_components`` is a few-MB UNet/VAE/text encoder for tests and offline runs: its images
are noise-like placeholders, not pictures. ``small_sd_components`` is a mid-size model for CPU
benchmarks; ``sd15_components`` has the shapes of SD 1.5, so benchmarks time realistic work
without fetching a checkpoint. ``load_sd_pipeline`` builds them as 'tiny', 'arch:small' and
'arch:sd15'. ``tiny_sdxl_components`` is the SDXL counterpart of 'tiny' ('tiny-sdxl': two CLIP
text encoders, the UNet's added time/text conditioning), shaped as diffusers' fast SDXL tests;
``load_sd_pipeline`` returns a ``StableDiffusionXLPipeline`` for it, for 'arch:small-sdxl' (a
mid-size SDXL-like model for CPU benchmarks) and for SDXL checkpoints (SDXL, SDXL-Turbo,
Lightning). ``char_tokenizer`` is the download-free CLIP tokenizer every
tiny model uses.
"""

from __future__ import annotations

from pathlib import Path

from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.quiet import install as hide_library_noise
from dsbuild.models import checkpoint, dtype_kwarg, torch_dtype
from dsbuild.models import warn_tiny as _warn

IP2P_CHANNELS = 8  # an InstructPix2Pix UNet's input: noisy latents + the input image's latents
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
    "set_alpha_to_one": False, "prediction_type": "epsilon", "timestep_spacing": "leading",
}


def char_tokenizer(max_length: int = 77, pad_token: str | None = None):
    """A real CLIPTokenizer over single bytes (each also with ``</w>``): no merges, no download.
    ``pad_token``: SDXL's second tokenizer pads with "!" (the first with the end token)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], **({"pad_token": pad_token} if pad_token else {}))
    tok.model_max_length = max_length
    return tok


def _text_encoder(hidden: int, inter: int, heads: int, layers: int, vocab: int, tok, proj: int,
                  act: str = "quick_gelu", projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=proj, hidden_act=act,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_sd_components(seed: int = 0) -> dict:
    """Tiny UNet (two attention levels), VAE (x2 downsampling), CLIP text encoder, tokenizer."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        # diffusers' legacy name for the number of heads: 2 heads of 16/32 channels (8 heads
        # of 4-8 channels made CPU attention, and so every tiny run, twice as slow)
        attention_head_dim=2, norm_num_groups=16,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=16, sample_size=64,
    )
    tok = char_tokenizer()
    torch.manual_seed(seed)
    text = _text_encoder(32, 37, 4, 2, len(tok), tok, 32)
    sched = EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tok, "scheduler": sched}


SDXL_SCHEDULER_CONFIG = {**SD_SCHEDULER_CONFIG, "interpolation_type": "linear",
                         "timestep_spacing": "leading", "use_karras_sigmas": False}


def tiny_sdxl_components(seed: int = 0, time_cond_proj_dim: int | None = None) -> dict:
    """Tiny SDXL as diffusers' fast SDXL tests build it: a UNet with "text_time" added
    conditioning (time ids + pooled text), CLIPTextModel + CLIPTextModelWithProjection whose
    penultimate states are concatenated (32 + 32 = 64-d cross-attention), two tokenizers that
    split text alike (the second pads with "!", as SDXL's). ``time_cond_proj_dim``: a UNet
    that embeds the guidance scale, as LCM-distilled ones do."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=16, time_cond_proj_dim=time_cond_proj_dim,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=16, sample_size=64,
    )
    tok, tok2 = char_tokenizer(), char_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    text = _text_encoder(32, 37, 4, 2, len(tok), tok, 32, act="gelu")
    torch.manual_seed(seed + 1)
    text2 = _text_encoder(32, 37, 4, 2, len(tok2), tok2, 32, act="gelu", projection=True)
    sched = EulerAncestralDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text2,
            "tokenizer": tok, "tokenizer_2": tok2, "scheduler": sched}


def small_sdxl_components() -> dict:
    """A mid-size SDXL-like model ('arch:small-sdxl': SDXL's block layout, 64-d heads, two
    128-d text encoders) so CPU timings of the SDXL path mean something."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 128), layers_per_block=1, sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 2), transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + 128,
        cross_attention_dim=256, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                        norm_num_groups=32)
    tok, tok2 = char_tokenizer(), char_tokenizer(pad_token="!")
    text = _text_encoder(128, 256, 4, 2, len(tok), tok, 128, act="gelu")
    text2 = _text_encoder(128, 256, 4, 2, len(tok2), tok2, 128, act="gelu", projection=True)
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text2,
            "tokenizer": tok, "tokenizer_2": tok2,
            "scheduler": EulerAncestralDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)}


SDXL_BUILT = {"tiny-sdxl": tiny_sdxl_components, "arch:small-sdxl": small_sdxl_components}


def is_sdxl(model: str) -> bool:
    """Whether ``model`` names an SDXL pipeline: 'tiny-sdxl', or a checkpoint whose
    model_index.json says StableDiffusionXLPipeline or lists a text_encoder_2."""
    if model in SDXL_BUILT:
        return True
    if model in ("tiny", "arch:small", "arch:sd15") or _lora_marker(model) is not None:
        return False
    try:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(model)
    except Exception:  # noqa: BLE001 - no readable index: the SD loader says what is wrong
        return False
    return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index


def sd15_components(seed: int = 0) -> dict:
    """SD 1.5-shaped UNet (860M), VAE and ViT-L text encoder with random weights."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, layers_per_block=2, sample_size=512, scaling_factor=0.18215,
    )
    tok = char_tokenizer()
    text = _text_encoder(768, 3072, 12, 12, 49408, tok, 768)
    sched = EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tok, "scheduler": sched}


def small_sd_components() -> dict:
    """A mid-size SD-like model (3 attention levels, 128-d text) so CPU timings mean something."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 128), layers_per_block=1, sample_size=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=32, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                        norm_num_groups=32)
    tok = char_tokenizer()
    text = _text_encoder(128, 256, 4, 2, len(tok), tok, 128)
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tok,
            "scheduler": EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)}


def warn_tiny(name: str = "tiny") -> None:
    """Say on stderr that a tiny SD model makes placeholder images."""
    _warn(f"model {name!r}", "images", "use a real SD 1.x/2.x or SDXL checkpoint for data")


def _lora_marker(model: str) -> dict | None:
    from dsbuild.models.lora import read_marker

    return read_marker(model) if Path(model).is_dir() else None


def load_sd_pipeline(model: str, dtype: str = "fp32", device: str = "cpu", quiet: bool = False,
                     setting: str = "generate.model"):
    """A StableDiffusionPipeline (no safety checker) from 'tiny', 'arch:small', 'arch:sd15'
    (random weights built from config), a dir or a Hub id; a LoRA folder written by
    ``dsbuild train-generator`` loads its base and merges the LoRA into it. 'tiny-sdxl' and
    SDXL checkpoints (:func:`is_sdxl`) give a StableDiffusionXLPipeline. Errors name
    ``setting``."""
    require("diffusers")
    from diffusers import StableDiffusionPipeline

    hide_library_noise()

    td = torch_dtype(dtype)
    built = {"tiny": tiny_sd_components, "arch:small": small_sd_components,
             "arch:sd15": sd15_components}
    if is_sdxl(model):
        return _load_sdxl(model, td, device, quiet, setting)
    if model in built:
        comps = built[model]()
        if model == "tiny" and not quiet:
            warn_tiny()
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif (marker := _lora_marker(model)) is not None:  # `dsbuild train-generator --method lora`
        from dsbuild.models.lora import apply_lora_folder

        pipe = load_sd_pipeline(marker["base"], "fp32", "cpu", quiet=quiet, setting=setting)
        apply_lora_folder(pipe, model, marker)
    else:
        src = checkpoint(model, setting, "diffusers folder")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                src, **dtype_kwarg(td), safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as exc:
            raise DsbuildError(f"{setting}: cannot load Stable Diffusion from {model!r}: "
                               f"{exc}") from None
    pipe = pipe.to(device)
    if pipe.unet.dtype != td:
        pipe = pipe.to(dtype=td)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_sdxl(model: str, td, device: str, quiet: bool, setting: str):
    """A StableDiffusionXLPipeline (no watermarker); in fp16 a VAE that asks to be upcast
    (SDXL's overflows in fp16) stays fp32, as the pipeline upcasts it to decode."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    if model in SDXL_BUILT:
        if model == "tiny-sdxl" and not quiet:
            warn_tiny(model)
        pipe = StableDiffusionXLPipeline(**SDXL_BUILT[model](), add_watermarker=False)
    else:
        src = checkpoint(model, setting, "diffusers folder")
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(src, **dtype_kwarg(td),
                                                             add_watermarker=False)
        except (OSError, ValueError) as exc:
            raise DsbuildError(f"{setting}: cannot load SDXL from {model!r}: {exc}") from None
    pipe = pipe.to(device)
    if pipe.unet.dtype != td:
        pipe = pipe.to(dtype=td)
    if td == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_sd_components(model: str, setting: str = "--base") -> dict:
    """UNet, VAE, text encoder, tokenizer and scheduler config of an SD-shaped checkpoint (4
    or 8 UNet input channels); errors name ``setting``."""
    require("diffusers")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    hide_library_noise()

    src = checkpoint(model, setting, "diffusers folder")
    loaders = {"unet": UNet2DConditionModel.from_pretrained, "vae": AutoencoderKL.from_pretrained,
               "text_encoder": CLIPTextModel.from_pretrained,
               "tokenizer": CLIPTokenizer.from_pretrained}
    comps: dict = {}
    for part, load in loaders.items():
        try:
            comps[part] = load(src, subfolder=part)
        except Exception as exc:  # noqa: BLE001 - missing folder, bad config, not SD at all
            raise DsbuildError(
                f"{setting}: {model!r} is not a Stable Diffusion 1.x/2.x checkpoint: its "
                f"{part}/ does not load ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); a base needs "
                f"{', '.join(p + '/' for p in SD_PARTS)}") from None
    try:
        comps["scheduler_config"] = dict(DDPMScheduler.load_config(src, subfolder="scheduler"))
    except Exception as exc:  # noqa: BLE001
        raise DsbuildError(f"{setting}: {model!r} has no readable scheduler/ config "
                           f"({type(exc).__name__})") from None
    check_sd_shape(comps, model, setting)
    return comps


def check_sd_shape(comps: dict, model: str, setting: str) -> None:
    """Refuse what is not SD 1.x/2.x-shaped (SDXL, other latent sizes, mismatched towers)."""
    ucfg, vcfg = comps["unet"].config, comps["vae"].config
    problems = []
    if ucfg.get("addition_embed_type"):
        problems.append(f"its UNet has addition embeddings ({ucfg['addition_embed_type']}: "
                        "SDXL-style)")
    if ucfg.get("in_channels") not in (4, IP2P_CHANNELS):
        problems.append(f"its UNet takes {ucfg.get('in_channels')} channels (4 or 8 expected)")
    if ucfg.get("out_channels") != vcfg.get("latent_channels", 4):
        problems.append(f"UNet outputs {ucfg.get('out_channels')} channels, the VAE has "
                        f"{vcfg.get('latent_channels')} latent channels")
    hidden = comps["text_encoder"].config.hidden_size
    if ucfg.get("cross_attention_dim") != hidden:
        problems.append(f"UNet cross-attention takes {ucfg.get('cross_attention_dim')}-d text, "
                        f"the text encoder gives {hidden}-d")
    if problems:
        raise DsbuildError(f"{setting}: {model!r} is not SD 1.x/2.x-shaped: "
                           + "; ".join(problems))
