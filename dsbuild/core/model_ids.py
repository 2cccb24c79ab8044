"""The default model of each family, named once: settings defaults and help texts use these."""

from __future__ import annotations

SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # generate.model: SD 1.5, as IP2P used
CLIP = "ViT-L-14"  # open_clip name of filter's and eval's CLIP, as InstructPix2Pix filtered
CLIP_PRETRAINED = "openai"  # its pretrained tag
DINO = "facebook/dinov2-base"
OWL = "google/owlv2-base-patch16-ensemble"  # verify's detector and the SAM segmenter's boxes
CLIPSEG = "CIDAS/clipseg-rd64-refined"  # the default referring segmenter
SAM = "facebook/sam-vit-base"
