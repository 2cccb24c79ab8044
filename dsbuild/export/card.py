"""The dataset card (README.md with Hub YAML metadata), its grid image, and a privacy check.

The card says what is in the export (counts per split, agent, operation), how it was made
(captions, the generator and its parameters, filter thresholds, augmentation, review policy,
split) and how diverse its captions are, and shows sample pairs. It never carries secrets or
absolute local paths: :func:`check_public` scans every exported file before it counts.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from dsbuild.core.build import Build
from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.records import write_figure
from dsbuild.core.schema import public_name
from dsbuild.core.split import SPLITS, caption_key
from dsbuild.export import card_notes as notes
from dsbuild.export.dataset import ExportRows

GRID_NAME = "grid.png"
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "LABEL_STUDIO_API_KEY",
              "LABEL_STUDIO_TOKEN")
SECRET_PATTERNS = (re.compile(rb"hf_[A-Za-z0-9]{30,}"), re.compile(rb"sk-[A-Za-z0-9_-]{20,}"))


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for n rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def card_data(build: Build, rows: ExportRows):
    """The card's YAML header as huggingface_hub's ``DatasetCardData``: license, task, size,
    and one config with a file glob per split."""
    hub = require("huggingface_hub")
    s = build.config.export
    total = sum(len(v) for v in rows.splits.values())
    return hub.DatasetCardData(
        license=s.license,
        language=s.language,
        task_categories=["image-to-image"],
        tags=["image-editing", "instruct-pix2pix", "synthetic", "dsbuild"],
        size_categories=[size_category(total)],
        pretty_name=s.pretty_name or build.recipe.name,
        configs=[{"config_name": "default", "data_files": [
            {"split": k, "path": f"data/{k}-*"} for k in SPLITS if rows.splits[k]]}],
    )


def _table(header: list[str], body: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join("—" if c is None else str(c) for c in r) + " |" for r in body]
    return out


def _count_table(rows: ExportRows, key: str, extra: str | None = None) -> list[str]:
    counts = {k: Counter(r[key] for r in rows.splits[k]) for k in SPLITS}
    values = sorted(set().union(*counts.values()), key=str)
    lookup = {}
    if extra:
        for k in SPLITS:
            for r in rows.splits[k]:
                lookup[r[key]] = r[extra]
    head = [key] + ([extra] if extra else []) + list(SPLITS) + ["total"]
    body = []
    for v in values:
        cells = [counts[k][v] for k in SPLITS]
        body.append([v] + ([lookup.get(v)] if extra else []) + cells + [sum(cells)])
    return _table(head, body)


def _range(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    lo, hi = min(vals), max(vals)
    return f"{lo:g}" if lo == hi else f"{lo:g} – {hi:g}"


def diversity_section(build: Build) -> list[str]:
    """The overall table of reports/diversity.md, or a note that it was not computed."""
    md = build.reports_dir / "diversity.md"
    if not md.exists():
        return ["Not computed (run `dsbuild report diversity BUILD`, or `dsbuild run`)."]
    text = md.read_text(encoding="utf-8")
    if "## Overall" not in text:
        return ["Not computed (reports/diversity.md has no overall table)."]
    part = text[text.index("## Overall") + len("## Overall"):]
    end = part.find("\n## ")
    table = part[:end] if end >= 0 else part
    return ["Lexical diversity of the caption triples (lexicalrichness; higher is more diverse, "
            "except ↓):", "", table.strip()]


def card_text(build: Build, rows: ExportRows, files: dict[str, list[str]],
              grid: bool = True, pushed: dict | None = None, folder: str = "export",
              funnel_picture: bool = False) -> str:
    """README.md: the YAML metadata (a huggingface_hub ``DatasetCard``) then the card body.
    ``pushed``: the folder's last push (its usage names that repo id), else ``folder``."""
    hub = require("huggingface_hub")
    cfg = build.config
    data = card_data(build, rows)
    title = data.pretty_name
    sp = rows.splits
    allrows = [r for k in SPLITS for r in sp[k]]
    models = sorted({str(r["model"]) for r in allrows if r.get("model")})
    lines = [f"# {title}", ""]
    desc = build.recipe.description.strip()
    lines += [f"Instruction-based image editing data (InstructPix2Pix-style rows: input image, "
              f"edit instruction, edited image) built with dsbuild from the recipe "
              f"`{build.recipe.name}`" + (f": {desc}" if desc else ".") , ""]
    tiny = notes.tiny_stages(build, models)
    if tiny:
        what = ("the images are noise-like placeholders with no meaning, and those stages' "
                "scores are random" if "generate" in tiny else
                "the images are real but those stages' scores and verdicts are random, so "
                "the pairs were kept by chance")
        lines += [f"> **Placeholder {'images' if 'generate' in tiny else 'scores'}.** This "
                  f"export was made with dsbuild's built-in tiny random models "
                  f"({', '.join(tiny)}; an offline demo or test build): {what}. Use a real "
                  "Stable Diffusion checkpoint and CLIP model for real data.", ""]
    lines += [f"Stages: {notes.stage_line(build, rows, models)}.", ""]
    if grid:
        lines += [f"![Sample pairs: input, edited]({GRID_NAME})", ""]
        trees = tree_links(build, grid_picks(rows, cfg.export.grid_pairs))
        if trees:
            lines += ["Design trees of the sessions on the grid (every run's images at the "
                      "nodes, instructions on the edges): "
                      + ", ".join(f"[session {sid[:8]}]({page})" for sid, page in trees), ""]
    lines += ["## Usage", "", *notes.usage_lines(folder, pushed), "",
              "`input_image`, `edit_prompt` and `edited_image` are the columns diffusers' "
              "`train_instruct_pix2pix.py` reads (`--original_image_column input_image "
              "--edit_prompt_column edit_prompt --edited_image_column edited_image`).", ""]
    lines += ["## Counts", ""]
    body = []
    for k in SPLITS:
        r = sp[k]
        body.append([k, len(r), sum(not x["no_change"] for x in r), sum(x["no_change"] for x in r),
                     len({x["triple_id"] for x in r}),
                     len({caption_key(x["original_prompt"]) for x in r}), len(files.get(k, []))])
    body.append(["total", len(allrows), sum(not x["no_change"] for x in allrows),
                 sum(x["no_change"] for x in allrows), len({x["triple_id"] for x in allrows}),
                 len({caption_key(x["original_prompt"]) for x in allrows}),
                 sum(len(v) for v in files.values())])
    lines += _table(["split", "rows", "edits", "no-change", "triples", "input captions",
                     "parquet shards"], body)
    lines += sessions_section(build, rows)
    lines += ["", "### Per agent", ""] + _count_table(rows, "agent", "level")
    lines += ["", "### Per operation", ""] + _count_table(rows, "operation")
    lines += ["", "## How it was made", "", "### Captions", ""]
    c = cfg.captions
    backends = Counter()
    for t in build.records("captions", require=False):
        src = t.get("source") or {}
        backends[f"{src.get('backend')}" + (f" ({public_name(src.get('model'))})"
                                            if src.get("model") else "")] += 1
    lines += [f"- backend: {', '.join(f'{k}: {v} triples' for k, v in backends.items()) or '—'}",
              f"- agents: {', '.join(f'`{a.name}` ({a.level})' for a in build.recipe.agents)}",
              f"- seed {c.seed}; triples per agent capped at: {c.per_agent or 'none'}", ""]
    lines += generation_section(build, rows, allrows, models)
    f = cfg.filter
    lines += ["", "### Filter", "",
              f"CLIP `{public_name(f.clip_model)}` / `{public_name(f.clip_pretrained)}`"
              + (" with InstructPix2Pix's metric preprocessing (`ip2p`)"
                 if f.clip_preprocess == "ip2p" else "")
              + (f", DINO `{public_name(f.dino_model)}`" if f.dino else "")
              + f"; top {f.top_k} pairs per triple by `clip_sim_dir` among those passing"
              + (f" (of a multi-turn session: its top {f.top_k} runs by their mean "
                 "`clip_sim_dir`, each turn passing the thresholds on its own)"
                 if any(r.get("session_id") for r in allrows) else "") + ":", ""]
    lines += _table(["score", "threshold"], [
        ["clip_sim_0 (input image ↔ input caption)", _minimum(f.clip_sim_0)],
        ["clip_sim_1 (edited image ↔ edited caption)", _minimum(f.clip_sim_1)],
        ["clip_sim_dir (image change ↔ caption change)", _minimum(f.clip_sim_dir)],
        ["clip_sim_image (input ↔ edited image)", _minimum(f.clip_sim_image)],
    ])
    lines += [""] + notes.verify_section(build, rows)
    lines += notes.edit_prompt_section(rows)
    lines += notes.calibration_section(build, rows)
    lines += notes.funnel_section(build, rows, funnel_picture)
    st = rows.stats
    a = cfg.augment
    lines += ["### No-change samples", "",
              f"Augment ({st.get('augment')}): ratio {a.ratio:g} of kept pairs, seed {a.seed}, "
              f"backend `{a.backend}`"
              + (f" (model `{public_name(a.model)}`, template fallback)"
                 if a.backend == "openai" else "") + ". The instruction names something the input caption does "
              "not mention (plurals and the recipe's synonyms count as mentions); the edited "
              "image is the input image and `no_change` is true. " + notes.no_change_counts(rows),
              ""]
    lines += ["### Review and split", "", *notes.review_lines(build, rows),
              f"- split: seeded (seed {cfg.split.seed}), test share {cfg.split.test_ratio:g}, "
              "grouped by triple and by caption, so no caption (input or edited) is in both "
              "splits; no-change samples follow their source pair's caption", ""]
    lines += ["## Diversity", ""] + diversity_section(build) + [""]
    lines += ["## Columns", ""]
    lines += _table(["column", "meaning"], [
        ["input_image / edited_image", "PNG images (edited = input for no-change rows)"],
        ["edit_prompt", "the instruction; a reviewer's correction replaces it and is "
         "authoritative (what the pair shows)"],
        ["original_prompt / edited_prompt", "the captions the input and edited image were "
         "generated from; on `corrected` rows `edited_prompt` may not describe the edited image"],
        ["corrected", "true when a reviewer corrected the instruction"],
        ["edit_prompt_generated / edit_prompt_recaptioned", "the instruction the pair was made "
         "from, and the one a vision-language model wrote from the two images (empty: not "
         "re-captioned, or it saw no change); `export.edit_prompt` picks which `edit_prompt` "
         "shows"],
        ["pair_id, triple_id, source_pair_id", "content-hash ids (build provenance)"],
        ["agent, level, operation", "recipe agent, object/room, add/remove/change/replace"],
        ["no_change", "true for augmentation rows"],
        ["seed, model, generator", "how the pair was made: its seed, model and generator"],
        [", ".join(rows.columns) or "—", "the parameters its generator declares (see "
         "Generation)"],
        ["params", "every parameter of the pair as JSON"],
        ["edit_mask", "what the generator let change (white: where the edited image may "
         "differ from the input; Prompt-to-Prompt's local-blend mask), the pair's ground-truth "
         "edit region; empty for pairs made without one and for no-change rows"],
        ["clip_sim_0, clip_sim_1, clip_sim_dir, clip_sim_image, dino, filter_rank",
         "filter scores (empty for no-change rows)"],
        ["review, original_edit", "latest review verdict and the instruction before correction"],
        ["photo_id, license, source, attribution", "the real photo a row starts from and its "
         "provenance (empty for generated rows; an empty license on a photo row: unknown)"],
        ["reconstruction_psnr", "PSNR (dB) of the inverted photo's reconstruction (photo rows "
         "made through inversion)"],
        ["session_id, session_run, turn, node_id, parent_id", "a multi-turn session's turn "
         "(MagicBrush-style): the session, its generated image chain (one seed), the turn "
         "(1 = an edit of the source image), the node and its parent node, whose edited image "
         "is this row's `input_image`; empty for single edits and no-change rows"],
        ["source_image", "the session's source image (turn 0), the same for every turn of a "
         "run; empty outside sessions"],
    ])
    lines += [""] + notes.provenance_section(rows)
    lines += notes.limitations_section(build, rows, models)
    lines += notes.license_section(build, rows, models)
    lines += notes.citation_section(build, rows, models)
    body = "\n".join(lines).rstrip() + "\n"
    # DatasetCard parses the header back, so a malformed one fails here, not on the Hub
    return str(hub.DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def generation_section(build: Build, rows: ExportRows, allrows: list[dict],
                       models: list[str]) -> list[str]:
    """How the pairs were made, per generator run (a build may mix them, ``generate.mix``):
    how many exported rows it made, its shared and own settings (its settings model) and the
    range of every parameter it declares over its rows."""
    from dsbuild.core import generators

    g = build.config.generate
    runs = dict(zip(g.labels(), g.runs(), strict=True))
    edits = [r for r in allrows if not r["no_change"]]

    def label_of(r: dict) -> str:
        name = str(r.get("generator") or generators.DEFAULT)
        for label, run in runs.items():
            if run.generator == name and (label == name or r.get("model") in
                                          (run.model, public_name(run.model))):
                return label
        return name

    found = {label_of(r) for r in allrows if r.get("generator")}
    names = [k for k in runs if k in found] + sorted(found - set(runs)) or [g.labels()[0]]
    lines = []
    if len(names) > 1:
        lines += [f"This build mixes {len(names)} generators (`generate.mix`): "
                  + ", ".join(f"{k} made {sum(label_of(r) == k for r in edits)} rows"
                              for k in names) + ".", ""]
    for label in names:
        run = runs.get(label, g)
        name = label.partition(":")[0]
        gen = generators.get(name)
        mine = [r for r in edits if label_of(r) == label]
        lines += [f"### Generation ({label}: {gen.help})", ""]
        if len(names) > 1:
            lines += [f"{len(mine)} exported rows were made by {label}.", ""]
        made_by = sorted({str(r["model"]) for r in mine if r.get("model")})
        body = [["model", ", ".join(made_by or (models if len(names) == 1 else []))
                 or public_name(run.model)], ["steps", run.steps],
                ["resolution", f"{run.width}×{run.height}"],
                ["samples per triple (object / room)", f"{run.samples_object} / "
                 f"{run.samples_room}" + (f" (capped at {run.per_triple})"
                                          if run.per_triple else "")]]
        own = run.section(name)
        if gen.settings is not None and own is not None:
            # the settings that sign the build (P2P leaves out the segmenter's when unused)
            signed = own.signature_dict() if hasattr(own, "signature_dict") else own.model_dump()
            body += [[key, _setting(getattr(own, key))] for key in gen.settings.model_fields
                     if key in signed]
        body.append(["seed", run.seed])
        lines += _table(["setting", "value"], body) + [""]
        if len(names) > 1:
            lines += [f"Parameters of the pairs {label} made (as it declares them):", ""]
            lines += _table(["parameter", "range in the export"], [
                [col, _values(p.type, [r.get(col) for r in mine])]
                for col, p in gen.columns().items()]) + [""]
    lines += [f"{sum(bool(r['_images'].get('mask')) for r in allrows)} rows carry their blend "
              "mask (`edit_mask`), what the generator let change.", ""]
    if len(names) > 1:
        return lines
    lines += ["Parameters of the exported pairs (as their generators declare them):", ""]
    lines += _table(["parameter", "range in the export"], [
        [col, _values(p.type, [r.get(col) for r in edits])] for col, p in rows.columns.items()])
    return lines + [""]


def _minimum(v: float) -> str:
    """A threshold as the card shows it: ``off`` where a cosine minimum passes every pair."""
    return "off (every pair passes)" if v <= notes.OFF else f"≥ {v:g}"


def _setting(v) -> str:
    """A setting's value for the card: a range as ``lo – hi``, a model name made public."""
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return f"{v[0]:g} – {v[1]:g}"
    if isinstance(v, list):
        return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) or "—"
    if isinstance(v, str):
        return str(public_name(v))
    return str(v)


def _values(kind: str, values: list) -> str:
    """A declared parameter across rows: numbers as a range, text as its distinct values, JSON
    as how many rows set it."""
    if kind in ("int", "float"):
        return _range(values)
    if kind == "json":
        n = sum(v is not None for v in values)
        return f"set on {n} of {len(values)} rows" if n else "—"
    return ", ".join(sorted({str(v) for v in values if v is not None})) or "—"


def sessions_section(build: Build, rows: ExportRows) -> list[str]:
    """The card's session counts: what the captions hold (sessions, turns, branch points), what
    the export holds, its runs by length (the turns kept under ``export.session_cut``) and how
    single-turn trainers read the same rows; nothing for a build without sessions."""
    from dsbuild.core import sessions

    counts = sessions.tree_counts(build.records("captions", require=False))
    if not counts["sessions"]:
        return []
    per = {k: [r for r in rows.splits[k] if sessions.is_session(r)] for k in SPLITS}
    body = []
    for k in [*SPLITS, "total"]:
        rs = [r for v in per.values() for r in v] if k == "total" else per[k]
        lengths = sessions.run_lengths(rs)
        body.append([k, len({r["session_id"] for r in rs}), len({r["node_id"] for r in rs}),
                     len({r["session_run"] for r in rs}), len(rs),
                     ", ".join(f"{n} turn{'s' if n != 1 else ''}: {c}"
                               for n, c in sorted(lengths.items())) or "—"])
    mode = build.config.export.session_cut
    return ["", "### Sessions", "",
            f"The captions hold {counts['sessions']} multi-turn sessions: {counts['turns']} "
            f"turns, {counts['branches']} branch points, turns up to {counts['max_turn']}. A "
            "session row's `input_image` is its parent turn's edited image and `source_image` "
            "the run's source image (MagicBrush-style); a single-turn trainer reads the same "
            "rows as flat pairs. Cut: "
            + ("`prefix` (a turn left out by the filter, verify or review drops the turns "
               "under it; the turns before it stay)" if mode == "prefix" else
               "`whole` (a run is exported only when every turn passes)")
            + "; the split keeps a whole session (every run, and its source caption) on one "
            "side.", ""] + _table(["split", "sessions", "turns (nodes)", "runs", "rows",
                                   "runs by length"], body)


def tree_links(build: Build, picks: list[dict]) -> list[tuple[str, str]]:
    """(session id, page) of the sessions among ``picks`` whose design-tree page ``dsbuild
    tree`` wrote; the export carries a copy at the same relative path
    (:func:`copy_tree_pages`)."""
    from dsbuild.core import sessions

    out: list[tuple[str, str]] = []
    for r in picks:
        sid = r.get("session_id")
        page = sessions.tree_page(sid) if sid else None
        if page and (build.root / page).is_file() and (sid, page) not in out:
            out.append((sid, page))
    return out


def copy_tree_pages(build: Build, rows: ExportRows, out: Path, n: int) -> list[str]:
    """Copy the tree pages (and their pictures) of the grid's sessions into the export."""
    import shutil

    copied = []
    for _, page in tree_links(build, grid_picks(rows, n)):
        for rel in (page, str(Path(page).with_suffix(".png"))):
            if (build.root / rel).is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(build.root / rel, out / rel)
                copied.append(rel)
    return copied


def grid_picks(rows: ExportRows, n: int) -> list[dict]:
    """The grid's rows: up to ``n`` pairs, one per triple, agents taken in turn, and one
    no-change sample when there is one."""
    if n <= 0:
        return []
    pool = [r for k in SPLITS for r in rows.splits[k]]
    by_agent: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for r in sorted(pool, key=lambda r: r["pair_id"]):
        if not r["no_change"] and r["triple_id"] not in seen:  # one pair per triple
            seen.add(r["triple_id"])
            by_agent.setdefault(str(r["agent"]), []).append(r)
    no_change = sorted((r for r in pool if r["no_change"]), key=lambda r: r["pair_id"])
    picks: list[dict] = []
    want = n - 1 if no_change and n > 1 else n
    while len(picks) < want and any(by_agent.values()):
        for agent in sorted(by_agent):
            if by_agent[agent] and len(picks) < want:
                picks.append(by_agent[agent].pop(0))
    picks += no_change[:n - len(picks)]
    return picks


def grid_image(build: Build, rows: ExportRows, path: Path, n: int) -> bool:
    """A PNG of up to ``n`` sample pairs (input | edited, instruction as title), agents mixed."""
    picks = grid_picks(rows, n)
    if not picks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(len(picks), 2, figsize=(6, 3.1 * len(picks)), squeeze=False)
    for (ax0, ax1), r in zip(axes, picks, strict=True):
        for ax, rel in ((ax0, r["_images"]["input"]), (ax1, r["_images"]["output"])):
            ax.imshow(Image.open(build.root / rel).convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
        ax0.set_title(_wrap(r["original_prompt"]), fontsize=8)
        tag = " [no change]" if r["no_change"] else ""
        ax1.set_title(_wrap(f"“{r['edit_prompt']}”{tag}"), fontsize=8)
        turn = f", turn {r['turn']}" if r.get("session_id") else ""
        ax0.set_ylabel(f"{r['agent']}{turn}", fontsize=8)
    fig.suptitle("Sample pairs: input (left), edited (right)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.1 * len(picks))))
    write_figure(path, fig, dpi=90)
    return True


def _wrap(text: str, width: int = 42) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])


def secrets_in_env(build: Build | None = None) -> list[bytes]:
    """Values of the environment's secrets (tokens, API keys) worth scanning for."""
    names = list(SECRET_ENV)
    if build is not None:
        names += [build.config.captions.api_key_env, build.config.augment.api_key_env]
    vals = [os.environ.get(n, "") for n in names]
    return [v.encode() for v in vals if len(v) >= 8]


def local_paths(build: Build | None, folder: Path) -> list[bytes]:
    """Absolute local paths that must never appear in a public file."""
    paths = {str(folder.resolve())}
    try:
        paths.add(str(Path.home()))
    except RuntimeError:  # no home directory known
        pass
    if build is not None:
        paths |= {str(build.root.resolve()), str(build.root.absolute())}
    return [p.encode() for p in paths if len(p) > 1]


def _parquet_strings(path: Path) -> bytes:
    """Every string value of a parquet file (image file names included), newline-joined."""
    import pyarrow.parquet as pq

    out: list[str] = []
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches():
        for col in batch.to_pylist():
            for v in col.values():
                if isinstance(v, str):
                    out.append(v)
                elif isinstance(v, dict) and isinstance(v.get("path"), str):
                    out.append(v["path"])
    return "\n".join(out).encode()


def check_public(folder: Path, build: Build | None = None) -> None:
    """Raise when a file under ``folder`` holds a secret or an absolute local path.

    Text files are scanned whole; parquet shards by their string values and image names;
    images are pixels we wrote, so they are not scanned.
    """
    needles = [(s, "a secret from the environment") for s in secrets_in_env(build)]
    needles += [(p, f"the local path {p.decode()}") for p in local_paths(build, folder)]
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix.lower() in (".png", ".jpg", ".jpeg"):
            continue
        if f.suffix == ".parquet":
            data = _parquet_strings(f)
            for v in data.split(b"\n"):
                if v.startswith(b"/") or v[1:3] == b":\\":
                    raise DsbuildError(f"{f.relative_to(folder)} holds an absolute path "
                                       f"{v.decode()[:80]!r}; refusing to publish it")
        else:
            data = f.read_bytes()
        for needle, what in needles:
            if needle in data:
                raise DsbuildError(f"{f.relative_to(folder)} contains {what}; refusing to "
                                   "publish it")
        for pat in SECRET_PATTERNS:
            if pat.search(data):
                raise DsbuildError(f"{f.relative_to(folder)} contains something that looks like "
                                   "an access token; refusing to publish it")
