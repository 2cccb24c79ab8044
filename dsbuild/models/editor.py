"""Editing pipelines: the InstructPix2Pix editor (a pipeline over given modules, the loader of
a checkpoint: 'tiny', a folder such as ``dsbuild train``'s output, or a Hub id, and its tiny
build) and the diffusers editing pipelines the editor generator drives (InstructPix2Pix, SDXL
InstructPix2Pix, FLUX.1 Kontext, Qwen-Image-Edit: the class read from model_index.json), with
a tiny SDXL InstructPix2Pix and a tiny Kontext built from config."""

from __future__ import annotations

from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.quiet import install as hide_library_noise
from dsbuild.models import checkpoint, dtype_kwarg, torch_dtype
from dsbuild.models.sd import IP2P_CHANNELS


def tiny_editor_components(seed: int = 0) -> dict:
    """dsbuild's tiny SD components with an 8-channel UNet: a tiny InstructPix2Pix model."""
    import torch
    from diffusers import UNet2DConditionModel

    from dsbuild.models.sd import tiny_sd_components

    comps = tiny_sd_components(seed)
    torch.manual_seed(seed)
    comps["unet"] = UNet2DConditionModel.from_config(
        {**comps["unet"].config, "in_channels": IP2P_CHANNELS})
    return comps


def editor_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config: dict):
    """A StableDiffusionInstructPix2PixPipeline over these modules (Euler ancestral, as the
    published InstructPix2Pix model ships; no safety checker)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    sched = EulerAncestralDiscreteScheduler.from_config(scheduler_config)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_editor(model: str, device: str = "cpu", dtype: str = "fp32", quiet: bool = False,
                setting: str = "model"):
    """An InstructPix2Pix pipeline from 'tiny', a folder (e.g. ``dsbuild train``'s output) or a
    Hub id; anything whose UNet does not take 8 channels is refused with what to do. Errors
    name ``setting``."""
    require("diffusers")
    hide_library_noise()
    td = torch_dtype(dtype)
    if model == "tiny":
        from dsbuild.models.sd import warn_tiny

        comps = tiny_editor_components()
        sched = comps.pop("scheduler")
        pipe = editor_pipeline(scheduler_config=dict(sched.config), **comps)
        if not quiet:
            warn_tiny()
    else:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        src = checkpoint(model, setting, "diffusers folder")
        try:
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                src, safety_checker=None, requires_safety_checker=False, **dtype_kwarg(td))
        except Exception as exc:  # noqa: BLE001
            raise DsbuildError(f"{setting} {model!r}: cannot load an InstructPix2Pix pipeline "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                               ) from None
        pipe.set_progress_bar_config(disable=True)
    ch = pipe.unet.config.in_channels
    if ch != IP2P_CHANNELS:
        raise DsbuildError(f"{setting} {model!r}: its UNet takes {ch} input channels, not 8: it "
                           "is not an InstructPix2Pix model (fine-tune it with `dsbuild train`)")
    pipe = pipe.to(device)
    if pipe.unet.dtype != td:
        pipe = pipe.to(dtype=td)
    return pipe


# ---------------------------------------------------------------------- editing pipelines
# the diffusers editing pipelines the editor generator drives (model_index.json _class_name)
EDIT_PIPELINES = ("StableDiffusionInstructPix2PixPipeline",
                  "StableDiffusionXLInstructPix2PixPipeline", "FluxKontextPipeline",
                  "QwenImageEditPipeline")
IP2P, SDXL_IP2P, KONTEXT = EDIT_PIPELINES[:3]
# built-in editors with random weights built from config ('tiny' is 'tiny-ip2p', as for eval)
TINY_EDITORS = {"tiny": IP2P, "tiny-ip2p": IP2P, "tiny-sdxl-ip2p": SDXL_IP2P,
                "tiny-kontext": KONTEXT}


def tiny_sdxl_ip2p_components(seed: int = 0) -> dict:
    """A tiny SDXL InstructPix2Pix, as diffusers' fast test builds it: dsbuild's tiny SDXL
    (two CLIP text encoders, "text_time" added conditioning) with an 8-channel UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from dsbuild.models.sd import tiny_sdxl_components

    comps = tiny_sdxl_components(seed)
    torch.manual_seed(seed)
    comps["unet"] = UNet2DConditionModel.from_config(
        {**comps["unet"].config, "in_channels": IP2P_CHANNELS})
    return comps


def t5_char_tokenizer():
    """A real T5 tokenizer over single characters (a Unigram model built in memory): no
    download, so a tiny T5 text encoder has a tokenizer that saves and loads like T5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in chars] + [(c, -2.0) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                      special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", extra_ids=0)


def tiny_kontext_components(seed: int = 0) -> dict:
    """A tiny FLUX.1 Kontext: a one-block FluxTransformer2DModel with guidance embedding, a
    x2 VAE, tiny CLIP and T5 text encoders (as diffusers' fast Kontext tests build them)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dsbuild.models.sd import char_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    tok = char_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=32, hidden_act="gelu"))
    t5_tok = t5_char_tokenizer()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=16, sample_size=64, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    for module in (transformer, clip, t5, vae):
        module.eval()  # built modules train (T5's dropout); loaded ones are in eval mode
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "tokenizer": tok,
            "text_encoder_2": t5, "tokenizer_2": t5_tok,
            "scheduler": FlowMatchEulerDiscreteScheduler()}


def edit_pipeline_class(model: str, setting: str = "generate.model") -> str:
    """The editing pipeline class ``model`` holds: a built-in tiny editor's, else its
    ``model_index.json`` ``_class_name`` (a folder, or a Hub repo's cached or fetched file);
    anything else is one line naming ``setting``."""
    from dsbuild.models.hub import pipeline_class_name

    if model in TINY_EDITORS:
        return TINY_EDITORS[model]
    src = checkpoint(model, setting, "diffusers folder", "black-forest-labs/FLUX.1-Kontext-dev")
    found = pipeline_class_name(src, setting, "editing")
    if found not in EDIT_PIPELINES:
        raise DsbuildError(f"{setting}: {model!r} is a {found!r}, not a diffusers editing "
                           f"pipeline (model_index.json _class_name); give one of "
                           f"{', '.join(EDIT_PIPELINES)}, or one of {', '.join(list(TINY_EDITORS)[1:])}")
    return found


def load_edit_pipeline(model: str, dtype: str = "fp32", device: str = "cpu",
                       quiet: bool = False, setting: str = "generate.model"):
    """The diffusers editing pipeline ``model`` names, its class read from model_index.json
    (:func:`edit_pipeline_class`): 'tiny' / 'tiny-ip2p' / 'tiny-sdxl-ip2p' / 'tiny-kontext'
    (random weights built from config), a folder or a Hub id. Errors are one line naming ``setting``."""
    require("diffusers")
    import diffusers

    hide_library_noise()
    cls_name = edit_pipeline_class(model, setting)
    td = torch_dtype(dtype)
    if model in TINY_EDITORS and not quiet:
        from dsbuild.models import warn_tiny

        warn_tiny(f"model {model!r}", "images", "use a real editing pipeline for data")
    if cls_name == IP2P:
        return load_editor("tiny" if model in TINY_EDITORS else model, device, dtype,
                           quiet=True, setting=setting)
    if model == "tiny-kontext":
        pipe = diffusers.FluxKontextPipeline(**tiny_kontext_components())
    elif model == "tiny-sdxl-ip2p":
        pipe = diffusers.StableDiffusionXLInstructPix2PixPipeline(
            **tiny_sdxl_ip2p_components(), add_watermarker=False)
    else:
        cls = getattr(diffusers, cls_name)
        try:
            pipe = cls.from_pretrained(checkpoint(model, setting, "diffusers folder"),
                                       **dtype_kwarg(td))
        except Exception as exc:  # noqa: BLE001 - missing part, bad config, wrong weights
            raise DsbuildError(f"{setting}: cannot load {cls_name} from {model!r} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                               ) from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if pipe.dtype != td:
        pipe = pipe.to(dtype=td)
    return pipe
