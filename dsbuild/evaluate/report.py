"""What ``dsbuild eval`` shows: a markdown table with the models side by side (LangDesign's
shape) and the CLIP_dir-vs-CLIP_im curve over an image-guidance sweep (InstructPix2Pix's
plot); its grids of edits are ``dsbuild.core.grid``'s."""

from __future__ import annotations

# (key in the JSON, column title); cosines print ×100 in the table except CLIP_dir, which
# prints as the raw cosine LangDesign's table shows; L1 as it is
EDIT_COLUMNS = (("clip_im", "CLIP_im ↑"), ("clip_dir", "CLIP_dir ↑"), ("clip_out", "CLIP_out ↑"),
                ("dino", "DINO ↑"), ("clip_i", "CLIP-I (GT) ↑"), ("dino_gt", "DINO (GT) ↑"),
                ("l1", "L1 (GT) ↓"))
NO_CHANGE_COLUMNS = (("clip_im", "CLIP_im ↑"), ("dino", "DINO ↑"), ("l1", "L1 ↓"))
NOT_SCALED = {"l1", "clip_dir"}


IP2P_NOTE = " (InstructPix2Pix's metric preprocessing, `ip2p`)"


def _fmt(key: str, v) -> str:
    if v is None or v != v:  # None or NaN
        return "–"
    return f"{v:.4f}" if key in NOT_SCALED else f"{100 * v:.2f}"


def markdown_table(result: dict) -> str:
    """Models side by side at the main image guidance, then the no-change rows and the sweep
    (local paths shown by their last part, as in dataset cards)."""
    from dsbuild.core.schema import public_name

    b = result["backbones"]
    ig = result["settings"]["image_guidance"]
    lines = [
        f"Split `{result['split']}` of {public_name(result['data'])}: {result['rows']['edit']} edit rows, "
        f"{result['rows']['no_change']} no-change rows; text guidance "
        f"{result['settings']['guidance']}, image guidance {result['settings']['main_image_guidance']}, "
        f"{result['settings']['steps']} steps, seed {result['settings']['seed']}.",
        f"CLIP: {b['clip']}{IP2P_NOTE if b.get('clip_preprocess') == 'ip2p' else ''}; "
        f"DINO: {b['dino']}. Cosines ×100, except CLIP_dir: a raw cosine, as LangDesign's "
        "table prints it; L1 is the mean absolute pixel difference in [0, 1].",
        "",
        "| model | " + " | ".join(t for _, t in EDIT_COLUMNS) + " |",
        "|---|" + "---:|" * len(EDIT_COLUMNS),
    ]
    for name, m in result["models"].items():
        lines.append(f"| {public_name(name)} | " + " | ".join(_fmt(k, m["edit"].get(k))
                                                  for k, _ in EDIT_COLUMNS) + " |")
    if result["rows"]["no_change"]:
        lines += ["", "No-change rows (the instruction names something absent; the best edit "
                  "leaves the image alone — compared with the input):", "",
                  "| model | " + " | ".join(t for _, t in NO_CHANGE_COLUMNS) + " |",
                  "|---|" + "---:|" * len(NO_CHANGE_COLUMNS)]
        for name, m in result["models"].items():
            lines.append(f"| {public_name(name)} | " + " | ".join(_fmt(k, m["no_change"].get(k))
                                                      for k, _ in NO_CHANGE_COLUMNS) + " |")
    if len(ig) > 1:
        lines += ["", "Image-guidance sweep (CLIP_dir ↑ against CLIP_im ↑):", "",
                  "| model | image guidance | CLIP_dir | CLIP_im |", "|---|---:|---:|---:|"]
        for name, m in result["models"].items():
            for point in m["sweep"]:
                e = point["edit"]
                lines.append(f"| {public_name(name)} | {point['image_guidance']} | "
                             f"{_fmt('clip_dir', e.get('clip_dir'))} | "
                             f"{_fmt('clip_im', e.get('clip_im'))} |")
    if "turns" in result:
        lines += ["", *turns_table(result)]
    return "\n".join(lines) + "\n"


TURN_COLUMNS = (("clip_i", "CLIP-I ↑"), ("dino_gt", "DINO ↑"), ("l1", "L1 ↓"))


def turns_table(result: dict) -> list[str]:
    """The multi-turn table (``eval --turns``): each model per turn and at the final turn,
    against each turn's ground truth, its inputs the model's own outputs."""
    from dsbuild.core.schema import public_name

    t = result["turns"]
    runs = f"{t['runs']} session run{'s' if t['runs'] != 1 else ''}"
    lines = [f"Multi-turn (MagicBrush protocol): {runs}; turn 1 edits the "
             "source image, each later turn the model's own output of its parent turn; "
             f"image guidance {t['image_guidance']}; against each turn's ground truth"
             + (f" ({t['skipped']} rows skipped: their parent turn is not in the data)"
                if t["skipped"] else "") + ":",
             "", "| model | turn | rows | " + " | ".join(h for _, h in TURN_COLUMNS) + " |",
             "|---|---|---:|" + "---:|" * len(TURN_COLUMNS)]
    for name, m in result["models"].items():
        scores = m["turns"]
        for turn, v in [*scores["per_turn"].items(), ("final", scores["final"])]:
            lines.append(f"| {public_name(name)} | {turn} | {v['rows']} | "
                         + " | ".join(_fmt(k, v.get(k)) for k, _ in TURN_COLUMNS) + " |")
    return lines


def curve_figure(result: dict):
    """CLIP_dir (y, raw cosine) against CLIP_im (x, ×100) per model over the image-guidance
    sweep, as the table prints them (its sweep rows are the points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsbuild.core.schema import public_name

    def scaled(v):
        return None if v is None or v != v else 100 * v

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, m in result["models"].items():
        xs = [scaled(p["edit"].get("clip_im")) for p in m["sweep"]]
        ys = [p["edit"].get("clip_dir") for p in m["sweep"]]
        ys = [None if y is None or y != y else y for y in ys]
        ax.plot(xs, ys, marker="o", label=public_name(name))
        for p, x, y in zip(m["sweep"], xs, ys, strict=True):
            if x is not None and y is not None:
                ax.annotate(f"ig={p['image_guidance']}", (x, y), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):  # few ticks, no offset: a narrow sweep stays readable
        axis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(useOffset=False)
    ax.set_xlabel("CLIP_im ↑ (cosine ×100, input vs edit)")
    ax.set_ylabel("CLIP_dir ↑ (raw cosine)")
    ax.set_title(f"image-guidance sweep: text guidance {result['settings']['guidance']}, "
                 f"{result['settings']['steps']} steps", fontsize=10)
    ax.legend(fontsize=7, title="model", title_fontsize=7)
    fig.tight_layout()
    return fig
