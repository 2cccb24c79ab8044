"""Stable Diffusion components built from config with random weights (no download).

``tiny_components`` is a few-MB UNet/VAE/text encoder for tests and offline runs: its images
are noise-like placeholders, not pictures. ``small_components`` is a mid-size model for CPU
benchmarks; ``sd15_components`` has the shapes of SD 1.5, so benchmarks time realistic work
without fetching a checkpoint. ``load_sd_pipeline`` builds them as 'tiny', 'arch:small' and
'arch:sd15'.
"""

from __future__ import annotations

import sys

TINY_WARNING = ("warning: model 'tiny' has random weights built from config; its images are "
                "placeholders with no meaning (use a real SD 1.x/2.x checkpoint for data)")

SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
    "set_alpha_to_one": False, "prediction_type": "epsilon", "timestep_spacing": "leading",
}


def char_tokenizer(max_length: int = 77):
    """A real CLIPTokenizer over single bytes (each also with ``</w>``): no merges, no download."""
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
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = max_length
    return tok


def _text_encoder(hidden: int, inter: int, heads: int, layers: int, vocab: int, tok, proj: int,
                  act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=proj, hidden_act=act,
    )
    return CLIPTextModel(cfg)


def tiny_components(seed: int = 0) -> dict:
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


def small_components() -> dict:
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


def warn_tiny() -> None:
    print(TINY_WARNING, file=sys.stderr)
