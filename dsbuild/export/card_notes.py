"""The dataset card's prose beyond its tables: every stage in one line, what verify is, the
review counts, how to load the data (the Hub repo id once pushed), intended use and
limitations, licences and citations.

Everything here is said from what the build recorded (its settings, completion markers and
export stats), so a card never claims a stage, a model or a check the build did not run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from dsbuild.core.build import Build
from dsbuild.core.errors import DsbuildError
from dsbuild.core.records import write_text
from dsbuild.core.schema import public_name
from dsbuild.core.split import SPLITS
from dsbuild.export import citations as refs
from dsbuild.export.dataset import ExportRows

USAGE_START, USAGE_END = "<!-- dsbuild-usage -->", "<!-- /dsbuild-usage -->"
OFF = -1.0  # a cosine minimum at or below -1 passes every pair


def _marks(build: Build, stage: str) -> tuple[bool, int, list[dict]]:
    """Whether a stage is complete, its records and its ranks' stats."""
    marks = build.markers(stage)
    return (build.is_complete(stage), sum(m.get("records", 0) for m in marks.values()),
            [m.get("stats") or {} for m in marks.values()])


def _sum(stats: list[dict], key: str) -> int:
    return sum(int(s.get(key) or 0) for s in stats)


def _reasons(stats: list[dict]) -> Counter:
    out: Counter = Counter()
    for s in stats:
        out.update(s.get("reasons") or {})
    return out


def caption_backends(build: Build) -> Counter:
    """(backend, public model) -> triples, from the triples themselves (``auto`` resolved)."""
    out: Counter = Counter()
    for r in build.records("captions", require=False):
        src = r.get("source") or {}
        out[(str(src.get("backend")), public_name(src.get("model")))] += 1
    return out


def caption_backend(build: Build) -> tuple[str, str | None]:
    """The backend most triples came from, and its model."""
    common = caption_backends(build).most_common(1)
    if common:
        return common[0][0]
    c = build.config.captions
    return c.backend, (public_name(c.model) if c.backend != "template" else None)


def tiny_stages(build: Build, models: list[str]) -> list[str]:
    """The stages of this build that ran dsbuild's tiny random models (placeholders)."""
    cfg = build.config
    out = []
    if "tiny" in models:
        out.append("generate")
    if cfg.filter.clip_model == "tiny" or (cfg.filter.dino and cfg.filter.dino_model == "tiny"):
        out.append("filter")
    v = cfg.verify
    if build.is_complete("verify") and "tiny" in (v.detector, v.clip_model, v.dino_model):
        out.append("verify")
    return out


def stage_line(build: Build, rows: ExportRows, models: list[str]) -> str:
    """captions → generate → filter → verify → augment → diversity → export, each with what
    it did in this build and its counts."""
    st = rows.stats
    cfg = build.config
    _, n, _ = _marks(build, "captions")
    backends = sorted(b + (f" `{m}`" if m else "") for b, m in caption_backends(build)) \
        or [cfg.captions.backend]
    parts = [f"**captions** ({n} triples, {', '.join(backends)})"]
    _, n, _ = _marks(build, "generate")
    gens = sorted({str(r["generator"]) for k in SPLITS for r in rows.splits[k]
                   if r.get("generator")}) or [cfg.generate.generator]
    parts.append(f"**generate** ({n} pairs, {', '.join(gens)} on "
                 f"{', '.join(f'`{m}`' for m in models) or f'`{public_name(cfg.generate.model)}`'})")
    parts.append(f"**filter** ({st.get('kept', 0)} of {st.get('scored', 0)} pairs kept by "
                 f"CLIP{' and DINOv2' if cfg.filter.dino else ''} scores)")
    done, n, stats = _marks(build, "verify")
    if st.get("verify") == "applied":
        parts.append(f"**verify** ({n} checked, {_sum(stats, 'passed')} passed, "
                     f"{st.get('rejected_by_verify', 0)} left out)")
    else:
        parts.append("**verify** (not run)")
    if st.get("augment") == "included":
        exported = st.get("no_change_available", 0) - st.get("no_change_dropped", 0)
        parts.append(f"**augment** ({st.get('no_change_available', 0)} no-change samples, "
                     f"{exported} exported)")
    else:
        parts.append(f"**augment** ({st.get('augment', 'not run')})")
    parts.append("**diversity** (MTLD, Yule's K, Dugast's U², Guiraud of the captions)"
                 if diversity_computed(build) else "**diversity** (not computed)")
    counts = ", ".join(f"{k} {len(rows.splits[k])}" for k in SPLITS)
    parts.append(f"**export** (policy `{cfg.export.policy}`, {st.get('review_rejects', 0)} "
                 f"reject verdicts in review; {counts} rows)")
    return " → ".join(parts)


def diversity_computed(build: Build) -> bool:
    md = build.reports_dir / "diversity.md"
    return md.exists() and "## Overall" in md.read_text(encoding="utf-8")


def verify_section(build: Build, rows: ExportRows) -> list[str]:
    """What verify is (one paragraph) and what it did in this build."""
    st = rows.stats
    v = build.config.verify
    lines = ["### Verify", ""]
    if st.get("verify") != "applied":
        return lines + ["Verify did not run on this build: no check beyond the CLIP filter "
                        "asked whether each edit happened, and only where it should "
                        "(`dsbuild verify BUILD` does).", ""]
    judge = (f" A vision-language judge (`{public_name(v.judge.model)}`) also scored each pair "
             "0–10 for following the instruction, keeping the rest and image quality."
             if v.judge.enabled else "")
    tiny = (" **This build's verify ran tiny random models: its detector and change-check "
            "verdicts are placeholders** (the near-copy bound needs no model and holds)."
            if "tiny" in (v.detector, v.clip_model, v.dino_model) else "")
    lines += [f"Verify checks every pair the filter kept against its operation with an "
              f"open-vocabulary detector (`{public_name(v.detector)}`) looking for the phrases "
              "the two captions differ in: an *add* must show the new thing in the edited "
              "image and not in the input, a *remove* the reverse, a *replace* the old thing "
              "before and the new one after, and a *change* must find the thing, move its "
              "region the way the captions move (CLIP) and leave the rest of the image as it "
              "was (DINOv2 with the region painted out). An edited image that is a near copy "
              f"of its input is rejected too.{judge} Rejected pairs are left out of the "
              f"export.{tiny}", ""]
    _, n, stats = _marks(build, "verify")
    why = ", ".join(f"`{k}` {c}" for k, c in _reasons(stats).most_common()) or "none"
    rejected, out = n - _sum(stats, "passed"), st.get("rejected_by_verify", 0)
    lines += [f"In this build: {n} pairs checked, {_sum(stats, 'passed')} passed, {rejected} "
              f"rejected (reasons: {why}) and "
              + ("so left out of the export." if out == rejected else
                 f"{out} of them left out of the export (the others the filter no longer "
                 "keeps)."), ""]
    return lines


def edit_prompt_section(rows: ExportRows) -> list[str]:
    """Which instruction ``edit_prompt`` holds and how often the re-caption differs from the
    generated one (only where re-captioning ran or ``export.edit_prompt`` asks for it)."""
    st = rows.stats
    if "edit_prompt" not in st:
        return []
    n = sum(not r["no_change"] for k in rows.splits for r in rows.splits[k])
    rc, differ = st["recaptioned"], st["recaption_differs"]
    share = f" ({differ / rc:.0%})" if rc else ""
    held = ("the re-captioned instruction where the pair has one, else the generated one"
            if st["edit_prompt"] == "recaptioned" else "the generated instruction (the one "
            "the pair was made from)")
    dropped = (f" {st['dropped_unchanged']} pairs the re-captioner saw no change in were left "
               "out." if st["edit_prompt"] == "recaptioned" else "")
    return ["### Instructions", "",
            f"`edit_prompt` holds {held} (`export.edit_prompt={st['edit_prompt']}`); a "
            "curator's correction wins over both. A vision-language model, shown both images "
            f"and the instruction, re-captioned {rc} of the {n} exported edit rows, and its "
            f"instruction differs from the generated one in {differ}{share} of them (case, "
            "spacing and punctuation aside). Both are columns: `edit_prompt_generated` and "
            f"`edit_prompt_recaptioned`.{dropped}", ""]


def review_lines(build: Build, rows: ExportRows) -> list[str]:
    """The policy and review counts, every reject verdict counted once, where it acted."""
    st = rows.stats
    rejects = st.get("review_rejects", 0)
    pairs, samples = st.get("rejected_by_review", 0), st.get("no_change_rejected_by_review", 0)
    before = rejects - pairs - samples
    acted = (f": {pairs} edit pairs and {samples} no-change samples left out"
             + (f", {before} on pairs or samples already left out by the filter, verify or "
                "their source pair" if before else ""))
    return [
        f"- policy `{build.config.export.policy}`: {st.get('kept', 0)} of "
        f"{st.get('scored', 0)} scored pairs kept by the filter, "
        f"{st.get('rejected_by_verify', 0)} rejected by verify ({st.get('verify', 'not run')})",
        f"- review: {st.get('review_decisions', 0)} decisions; {rejects} reject verdicts in "
        f"force{acted if rejects else ''}; {st.get('review_accepts', 0)} accepts"
        + (f"; {st.get('not_accepted', 0)} pairs not accepted (policy `accepted`)"
           if build.config.export.policy == "accepted" else "")
        + f"; {st.get('corrected', 0)} instructions corrected (`original_edit` keeps the "
        "first one)",
    ]


CALIBRATION_PNG = "judge_calibration.png"  # reports/judge.png, copied beside the card


def calibration(build: Build, rows: ExportRows) -> dict | None:
    """The judge against the curators (:func:`dsbuild.core.agreement.calibrate` on every
    scored pair) where verify ran and decisions exist and some pair is both judged and decided,
    else None (computed once per export)."""
    st = rows.stats
    if st.get("verify") != "applied" or not st.get("review_decisions"):
        return None
    if not hasattr(rows, "_calibration"):
        from dsbuild.core import agreement, join

        rep = agreement.calibrate(join.rows(build, policy="scored")[0])
        rows._calibration = rep if rep["counts"]["pairs"] else None
    return rows._calibration


def calibration_picture(build: Build, rep: dict) -> Path | None:
    """reports/judge.png where ``dsbuild report judge`` drew it from these same numbers (its
    judge.json agrees), else None: a picture of older decisions is not shown."""
    import json

    png, js = build.reports_dir / "judge.png", build.reports_dir / "judge.json"
    try:
        old = json.loads(js.read_text(encoding="utf-8")) if png.exists() else None
    except (OSError, ValueError):
        return None
    same = isinstance(old, dict) and all(old.get(k) == rep[k]
                                         for k in ("counts", "confusion", "threshold"))
    return png if same else None


def copy_calibration_picture(build: Build, rows: ExportRows, folder: Path) -> bool:
    """Copy the calibration picture the card shows into the export ``folder``."""
    from dsbuild.core.records import write_bytes

    rep = calibration(build, rows)
    png = calibration_picture(build, rep) if rep else None
    if png is not None:
        write_bytes(folder / CALIBRATION_PNG, png.read_bytes())
    return png is not None


def calibration_section(build: Build, rows: ExportRows) -> list[str]:
    """"Judge calibration": κ, agreement, pairs and the best threshold, where decisions and
    judge scores exist (nothing otherwise)."""
    rep = calibration(build, rows)
    if rep is None:
        return []
    n, t = rep["counts"], rep["threshold"]
    from dsbuild.core.agreement import shown as f

    lines = ["### Judge calibration", "",
             f"The judge's verdict against the curators' on the {n['pairs']} pairs both judged "
             f"and reviewed: Cohen's κ {f(rep['kappa'])}, agreement {f(rep['agreement'])} "
             f"(confusion, judge × curators: pass/accept {rep['confusion']['pass_accept']}, "
             f"pass/reject {rep['confusion']['pass_reject']}, reject/accept "
             f"{rep['confusion']['reject_accept']}, reject/reject "
             f"{rep['confusion']['reject_reject']})."
             + (f" The threshold on the weighted score that best matches the curators is "
                f"{t['best']:g} (κ {f(t['best_kappa'])}; this build's: {t['current']:g})."
                if t["best"] is not None else "")
             + (f" Reviewed pairs without a judge score (a missing reply), counted apart: "
                f"{n['decided_missing']}." if n["decided_missing"] else ""), ""]
    if calibration_picture(build, rep):
        lines += [f"![Judge calibration: scores of accepted vs rejected pairs, κ by "
                  f"threshold]({CALIBRATION_PNG})", ""]
    return lines


def no_change_counts(rows: ExportRows) -> str:
    """How many no-change samples were made, exported and left out, and why."""
    st = rows.stats
    made, dropped = st.get("no_change_available", 0), st.get("no_change_dropped", 0)
    why = []
    if st.get("no_change_source_dropped"):
        why.append(f"{st['no_change_source_dropped']} because their source pair is not in the "
                   "export (left out by the filter, verify or review)")
    if st.get("no_change_rejected_by_review"):
        why.append(f"{st['no_change_rejected_by_review']} rejected in review")
    return (f"{made} no-change samples made, {made - dropped} exported, {dropped} left out"
            + (f": {'; '.join(why)}" if why else "") + ".")


def usage_lines(folder: str, pushed: dict | None) -> list[str]:
    """The load_dataset snippet: the Hub repo id once pushed, else the export's folder."""
    if pushed:
        rev = pushed.get("revision")
        arg = f'"{pushed["repo_id"]}"' + (f', revision="{rev}"' if rev and rev != "main"
                                          else "")
        note = ""
    else:
        arg = f'"{folder}"'
        note = "  # this export's folder; not pushed to the Hub yet"
    return [USAGE_START, "```python", "from datasets import load_dataset", "",
            f"ds = load_dataset({arg}){note}",
            'row = ds["train"][0]  # row["input_image"], row["edit_prompt"], row["edited_image"]',
            "```", USAGE_END]


def set_pushed(folder: Path, pushed: dict) -> None:
    """Make the card in ``folder`` load the data from the repo it is being pushed to."""
    card = Path(folder) / "README.md"
    text = card.read_text(encoding="utf-8")
    if USAGE_START not in text or USAGE_END not in text:
        raise DsbuildError(f"{card} has no usage section dsbuild can update (an older "
                           "export): re-export it with `dsbuild export BUILD --force`")
    head, rest = text.split(USAGE_START, 1)
    _, tail = rest.split(USAGE_END, 1)
    write_text(card, head + "\n".join(usage_lines("", pushed)) + tail)


def limitations_section(build: Build, rows: ExportRows, models: list[str]) -> list[str]:
    """Intended use, and what the data and its checks can and cannot be trusted for."""
    cfg = build.config
    st = rows.stats
    allrows = [r for k in SPLITS for r in rows.splits[k]]
    lines = ["## Intended use and limitations", "",
             "Made for training and evaluating instruction-based image editors (for example "
             "fine-tuning InstructPix2Pix with diffusers' `train_instruct_pix2pix.py`) in the "
             f"context of the recipe `{build.recipe.name}`, and for research on editing data. "
             "Not made for measuring an editor on real photographs alone (every image here is "
             "generated), nor for any use the generator's licence restricts (see License).", ""]
    tiny = tiny_stages(build, models)
    if tiny:
        lines += [f"- **Placeholder data.** {', '.join(tiny)} ran dsbuild's tiny random "
                  "models (an offline or test build): "
                  + ("the images are noise-like placeholders and " if "generate" in tiny
                     else "") + "the scores and verdicts of "
                  + ("those stages" if len(tiny) > 1 else "that stage") + " are random. "
                  "These rows test a pipeline; they teach an editor nothing. Do not train on "
                  "them."]
    real = [m for m in models if m != "tiny"]
    if real:
        lines += [f"- **Synthetic images.** Every image was generated by "
                  f"{', '.join(f'`{m}`' for m in real)} and carries its artefacts (hands, "
                  "text, fine geometry) and its biases: Stable Diffusion learned from "
                  "English-captioned web images (LAION), and its model card notes that it "
                  "takes Western cultures as the default."]
    backend, llm = caption_backend(build)
    if backend == "template":
        lines += ["- **Captions** were composed from the recipe's vocabulary (the template "
                  "backend): their variety is bounded by its word lists (see Diversity)."]
    else:
        lines += [f"- **Captions** were written by an LLM (`{llm}`): "
                  "they carry its biases and mistakes; the captions validator checks their "
                  "form and vocabulary, not whether they are true of an image."]
    f = cfg.filter
    off = [k for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")
           if getattr(f, k) <= OFF]
    lines += ["- **What the CLIP filter catches**: pairs whose images do not match their "
              "captions, and edits whose image change does not point the way the captions "
              "change. **What it cannot**: whether the named object is the one that changed, "
              "whether something else changed too, counts, positions and small objects; it "
              "reads only a caption's first 77 tokens."
              + (f" Off in this build (every pair passes them): {', '.join(off)}." if off
                 else "")]
    if st.get("verify") == "applied":
        lines += ["- **What verify catches**: an added thing that is not there, a removed "
                  "thing still there, a replace that did not swap, a change that spilled over "
                  "the image, a near copy. **What it cannot**: what the detector misreads "
                  "(unusual, tiny or hidden things, phrases it does not know), edits right in "
                  "kind but wrong in degree or style, artefacts outside its checks."]
    else:
        lines += ["- **Verify did not run**: nothing but CLIP similarity vouches that each edit "
                  "happened."]
    reviewed = sum(r.get("review") is not None for r in allrows)
    lines += [f"- **Review**: {reviewed} of {len(allrows)} exported rows carry a human "
              "verdict; the rest were never seen by a person.",
              "- **No-change rows** are labelled by rule (the instruction names something the "
              "input caption does not mention); the image may still show it.", ""]
    return lines


def _model_license(model: str) -> str:
    if model == "tiny":
        return ("The images were made by dsbuild's tiny random models: no trained weights and "
                "no model licence; they are noise.")
    known = refs.MODEL_LICENSES.get(model)
    if known is None:
        return (f"The images were generated with `{model}`: the licence on its model card "
                "governs what may be done with them; dsbuild does not know it, so check it "
                "before you use or share them.")
    name, url = known
    return (f"The images were generated with `{model}`, released under the [{name}]({url}) "
            "licence. Its licensor claims no rights in the images a user generates, but the "
            "user is accountable for them and their use, and no use may contravene the "
            "licence's use-based restrictions (its Attachment A: for example nothing unlawful, "
            "nothing that harms minors, no false information meant to harm others, no "
            "harassment). Use and share the images under those restrictions: this dataset's "
            "tag cannot lift them.")


def license_section(build: Build, rows: ExportRows, models: list[str]) -> list[str]:
    """What the YAML licence tag covers, what the generator's model licence means for the
    images, and the photo sources' licences (or that the build has none)."""
    cfg = build.config
    allrows = [r for k in SPLITS for r in rows.splits[k]]
    lines = ["## License", "",
             f"The `{cfg.export.license}` tag above covers what this dataset adds: the "
             "captions, instructions, review verdicts and corrections, scores and the "
             "compilation.", ""]
    lines += [f"- {_model_license(m)}" for m in (models or [public_name(cfg.generate.model)])]
    backend, llm = caption_backend(build)
    if backend != "template":
        lines += [f"- The captions were written by `{llm}` through "
                  "an OpenAI-compatible API: its provider's terms may apply to them."]
    photos = Counter(str(r.get("license") or "unknown") for r in allrows
                     if r.get("photo_id") or r.get("license"))
    if photos:
        lines += ["- Source photos, by licence (rows; see Provenance):"]
        lines += [f"  - {lic}: {n}" for lic, n in sorted(photos.items())]
    else:
        lines += ["- Source photos: this build records none (every image was generated), so "
                  "no photo licence applies."]
    lines += ["", "Whether generated images are protected by copyright at all differs from "
              "one jurisdiction to another.", ""]
    return lines


def provenance_section(rows: ExportRows) -> list[str]:
    """Where the real photos of the rows came from (the sources stage): rows and photos per
    licence, with unknown licences said plainly, per source, and the attributions. Empty for
    a build without photos (its rows are all generated; the licence section says so)."""
    allrows = [r for k in SPLITS for r in rows.splits[k]]
    mine = [r for r in allrows if r.get("photo_id")]
    if not mine:
        return []
    photos = {r["photo_id"]: r for r in mine}
    lic_rows = Counter(r.get("license") or "unknown" for r in mine)
    lic_photos = Counter(r.get("license") or "unknown" for r in photos.values())
    rest = len(allrows) - len(mine)
    lines = ["## Provenance", "",
             f"{len(mine)} of {len(allrows)} rows start from {len(photos)} real photos; the "
             "columns `photo_id`, `license`, `source` and `attribution` say which and whose."
             + (f" The other {rest} start from generated images." if rest else ""),
             "", "| licence | photos | rows |", "|---|---|---|"]
    lines += [f"| {lic} | {lic_photos[lic]} | {n} |" for lic, n in sorted(lic_rows.items())]
    unknown = lic_photos.get("unknown", 0)
    if unknown:
        lines += ["", f"**{unknown} photo(s) ({lic_rows['unknown']} rows) have an unknown "
                  "licence**: nobody recorded one. Find out before you share or train on them, "
                  "or rebuild with `sources.require_license: true` to leave them out."]
    sources = Counter(r.get("source") or "unknown" for r in photos.values())
    lines += ["", "Sources (photos): " + ", ".join(f"`{k}`: {n}" for k, n in
                                                   sorted(sources.items())) + "."]
    attributions = sorted({r["attribution"] for r in photos.values() if r.get("attribution")})
    if attributions:
        lines += ["", "Attributions:", ""] + [f"- {a}" for a in attributions]
    missing = sum(not r.get("attribution") for r in photos.values())
    if missing:
        lines += ["", f"{missing} photo(s) carry no attribution."]
    return lines + [""]


def used_references(build: Build, rows: ExportRows, models: list[str]) -> list[refs.Reference]:
    """The works whose methods this build ran, in pipeline order."""
    cfg = build.config
    gens = {str(r.get("generator") or cfg.generate.generator)
            for k in SPLITS for r in rows.splits[k]} or {cfg.generate.generator}
    verified = rows.stats.get("verify") == "applied"
    out = [refs.INSTRUCTPIX2PIX]
    if "p2p" in gens:
        out += [refs.PROMPT_TO_PROMPT, refs.LATENT_DIFFUSION]
        if any("xl" in m.lower() for m in models):
            out.append(refs.SDXL)
    out.append(refs.CLIP)
    if cfg.filter.dino or verified:
        role = ("filter's DINO score of the two images" if not verified else
                "verify's \"the rest stayed\" check" if not cfg.filter.dino else refs.DINOV2.role)
        out.append(replace(refs.DINOV2, role=role))
    if verified:
        out.append(refs.OWLV2)
        if cfg.verify.judge.enabled:
            out.append(refs.VIESCORE)
    if diversity_computed(build):
        out.append(refs.MTLD)
    return out


def citation_section(build: Build, rows: ExportRows, models: list[str]) -> list[str]:
    """The cited works with links, and BibTeX for those that have it."""
    used = used_references(build, rows, models)
    lines = ["## Citation", "",
             "Built with dsbuild, whose method follows the LangDesign round (InstructPix2Pix "
             "fine-tuned on interior-design pairs made this way). dsbuild records no public "
             "reference for LangDesign, so none is given here. The works this build used:", ""]
    lines += [f"- **{r.key}** — {r.cite}: [{r.title}]({r.url}). Used for {r.role}."
              for r in used]
    bib = [r.bibtex for r in used if r.bibtex]
    if bib:
        lines += ["", "```bibtex", "\n\n".join(bib), "```"]
    return lines + [""]


FUNNEL_PNG = "funnel.png"


def export_funnel(build: Build, rows: ExportRows) -> dict:
    """The build's survival funnel with these export rows as its last step."""
    from dsbuild.core import funnel as F

    return F.funnel(build, F.rows_exported([r for v in rows.splits.values() for r in v]))


def draw_funnel(build: Build, rows: ExportRows, folder: Path) -> Path:
    """``funnel.png`` in the export folder, for the card."""
    from dsbuild.core import funnel as F

    return F.plot(export_funnel(build, rows), Path(folder) / FUNNEL_PNG)


def funnel_section(build: Build, rows: ExportRows, picture: bool = False) -> list[str]:
    """"Survival funnel": where pairs dropped out, step by step (and its picture, which the
    export draws beside the card: :func:`draw_funnel`)."""
    f = export_funnel(build, rows)
    lines = ["### Survival funnel", "",
             "Generated pairs (no-change samples aside) through each step; a share is of the "
             "step before that ran.", "", "| step | count | share |", "|---|---|---|"]
    for s in f["steps"]:
        if s["count"] is None:
            continue
        share = (f"{s['per_triple']:.1f} per triple" if s.get("per_triple") is not None
                 else f"{s['share']:.0%}" if s["share"] is not None else "")
        lines.append(f"| {s['label']} | {s['count']} | {share} |")
    lines.append("")
    if f["aside"]["judge_missing"]:
        lines += [f"Judge scores missing (counted as passing the judge, never as 0): "
                  f"{f['aside']['judge_missing']}.", ""]
    if picture:
        lines += [f"![Survival funnel per step and per agent]({FUNNEL_PNG})", ""]
    return lines
