"""The works a dataset card cites, and the licences of the generator models it knows.

Each reference is checked against its paper (arXiv id or DOI); the card cites only those whose
method the build ran (see ``dsbuild.export.card.used_references``). LangDesign, the
interior-design fine-tuning round dsbuild's method follows, is named but not cited: dsbuild
records no public reference for it, and the card does not invent one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    key: str  # what the card calls it: InstructPix2Pix, CLIP, ...
    cite: str  # authors and year, as a reader quotes it
    title: str
    url: str
    role: str  # what this build used it for
    bibtex: str = ""


def _arxiv(n: str) -> str:
    return f"https://arxiv.org/abs/{n}"


INSTRUCTPIX2PIX = Reference(
    "InstructPix2Pix", "Brooks, Holynski & Efros, CVPR 2023",
    "InstructPix2Pix: Learning to Follow Image Editing Instructions", _arxiv("2211.09800"),
    "the data format (input image, instruction, edited image) and the recipe: LLM-written "
    "caption triples, Prompt-to-Prompt pairs, CLIP filtering",
    """@inproceedings{brooks2023instructpix2pix,
  title     = {InstructPix2Pix: Learning to Follow Image Editing Instructions},
  author    = {Brooks, Tim and Holynski, Aleksander and Efros, Alexei A.},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023},
  url       = {https://arxiv.org/abs/2211.09800}
}""")

PROMPT_TO_PROMPT = Reference(
    "Prompt-to-Prompt", "Hertz, Mokady, Tenenbaum, Aberman, Pritch & Cohen-Or, 2022",
    "Prompt-to-Prompt Image Editing with Cross Attention Control", _arxiv("2208.01626"),
    "generate: both images of a pair from one seed, the edited one under the input's "
    "cross-attention",
    """@article{hertz2022prompt,
  title   = {Prompt-to-Prompt Image Editing with Cross Attention Control},
  author  = {Hertz, Amir and Mokady, Ron and Tenenbaum, Jay and Aberman, Kfir and Pritch, Yael and Cohen-Or, Daniel},
  journal = {arXiv preprint arXiv:2208.01626},
  year    = {2022},
  url     = {https://arxiv.org/abs/2208.01626}
}""")

LATENT_DIFFUSION = Reference(
    "Stable Diffusion", "Rombach, Blattmann, Lorenz, Esser & Ommer, CVPR 2022",
    "High-Resolution Image Synthesis with Latent Diffusion Models", _arxiv("2112.10752"),
    "generate: the text-to-image model Prompt-to-Prompt runs on",
    """@inproceedings{rombach2022high,
  title     = {High-Resolution Image Synthesis with Latent Diffusion Models},
  author    = {Rombach, Robin and Blattmann, Andreas and Lorenz, Dominik and Esser, Patrick and Ommer, Bj{\\"o}rn},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2112.10752}
}""")

SDXL = Reference(
    "SDXL", "Podell et al., 2023",
    "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis",
    _arxiv("2307.01952"), "generate: the SDXL model Prompt-to-Prompt runs on")

CLIP = Reference(
    "CLIP", "Radford et al., ICML 2021",
    "Learning Transferable Visual Models From Natural Language Supervision",
    _arxiv("2103.00020"),
    "filter: the image-caption and direction similarities (through OpenCLIP, "
    "https://github.com/mlfoundations/open_clip)",
    """@inproceedings{radford2021learning,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning (ICML)},
  year      = {2021},
  url       = {https://arxiv.org/abs/2103.00020}
}""")

DINOV2 = Reference(
    "DINOv2", "Oquab et al., 2023",
    "DINOv2: Learning Robust Visual Features without Supervision", _arxiv("2304.07193"),
    "filter's DINO score of the two images and verify's \"the rest stayed\" check",
    """@article{oquab2023dinov2,
  title   = {DINOv2: Learning Robust Visual Features without Supervision},
  author  = {Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and Vo, Huy and Szafraniec, Marc and Khalidov, Vasil and Fernandez, Pierre and Haziza, Daniel and Massa, Francisco and El-Nouby, Alaaeldin and others},
  journal = {arXiv preprint arXiv:2304.07193},
  year    = {2023},
  url     = {https://arxiv.org/abs/2304.07193}
}""")

OWLV2 = Reference(
    "OWLv2", "Minderer, Gritsenko & Houlsby, NeurIPS 2023",
    "Scaling Open-Vocabulary Object Detection", _arxiv("2306.09683"),
    "verify: the open-vocabulary detector of the per-operation checks",
    """@inproceedings{minderer2023scaling,
  title     = {Scaling Open-Vocabulary Object Detection},
  author    = {Minderer, Matthias and Gritsenko, Alexey and Houlsby, Neil},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023},
  url       = {https://arxiv.org/abs/2306.09683}
}""")

VIESCORE = Reference(
    "VIEScore", "Ku, Jiang, Wei, Yue & Chen, ACL 2024",
    "VIEScore: Towards Explainable Metrics for Conditional Image Synthesis Evaluation",
    _arxiv("2312.14867"), "verify: the spirit of the vision-language judge's rubric")

MTLD = Reference(
    "MTLD", "McCarthy & Jarvis, Behavior Research Methods 2010",
    "MTLD, vocd-D, and HD-D: A validation study of sophisticated approaches to lexical "
    "diversity assessment", "https://doi.org/10.3758/BRM.42.2.381",
    "diversity: the caption diversity measures (computed with LexicalRichness, "
    "https://github.com/LSYS/LexicalRichness)",
    """@article{mccarthy2010mtld,
  title   = {MTLD, vocd-D, and HD-D: A validation study of sophisticated approaches to lexical diversity assessment},
  author  = {McCarthy, Philip M. and Jarvis, Scott},
  journal = {Behavior Research Methods},
  volume  = {42},
  number  = {2},
  pages   = {381--392},
  year    = {2010},
  doi     = {10.3758/BRM.42.2.381}
}""")

OPENRAIL_M = ("CreativeML OpenRAIL-M", "https://huggingface.co/spaces/CompVis/stable-diffusion-license")
OPENRAIL_PP = ("CreativeML OpenRAIL++-M",
               "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md")
# generator models whose licence the card can name (Hub id -> licence name, its text)
MODEL_LICENSES: dict[str, tuple[str, str]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": OPENRAIL_M,
    "runwayml/stable-diffusion-v1-5": OPENRAIL_M,
    "CompVis/stable-diffusion-v1-4": OPENRAIL_M,
    "stabilityai/stable-diffusion-xl-base-1.0": OPENRAIL_PP,
}
