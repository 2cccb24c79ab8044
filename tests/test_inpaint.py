"""Region edits (``generate.generator=inpaint``) and editors on photos.

Tiny models built from config: a pair equals calling the inpainting pipeline directly with the
same image, mask, seed and knobs; with ``composite`` the pixels outside the mask are the
source's exactly (tolerance 0 on the PNG's 1/255 grid); without it the pipeline's own
guarantee is what holds: a 4-channel model keeps the source's latents outside the mask (the
pixels there are the VAE's reconstruction), a 9-channel one keeps them only as far as it was
trained (tiny random weights: not at all). The pipeline class is read from a saved folder's
model_index.json; a masked pair exports with ``edit_mask``; the editor and inpaint generators
on a photo triple edit the photo itself, pixel-equal.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.core.referring import referred_by_rules  # noqa: E402
from dsbuild.generate.generators.inpaint.generator import (  # noqa: E402
    RegionInpainter,
    default_mask,
    dilate_mask,
    mask_pil,
    to_pil,
)
from dsbuild.generate.settings import GenerateSettings  # noqa: E402
from dsbuild.models.inpaint import (  # noqa: E402
    FLUX_FILL,
    SD_INPAINT,
    inpaint_pipeline_class,
    load_inpaint_pipeline,
)

SIZE, STEPS = 32, 2
CAPTION = "a living room with a wooden table and a grey sofa"
TRIPLES = [
    {"id": "t-rm", "input": CAPTION, "operation": "remove", "edit": "remove the sofa",
     "level": "object", "output": "a living room with a wooden table"},
    {"id": "t-add", "input": CAPTION, "operation": "add", "edit": "add a plant",
     "level": "object", "output": "a living room with a wooden table, a grey sofa and a plant"},
    {"id": "t-chg", "input": CAPTION, "operation": "change", "edit": "make the sofa red",
     "level": "object", "output": "a living room with a wooden table and a red sofa"},
]


def inpainter(model: str = "tiny-inpaint", **own) -> RegionInpainter:
    # the tiny CLIPSeg's placeholder maps: a high threshold and a thin dilation keep the
    # mask a part of the 32 px image
    own = {"threshold": 0.6, "dilate": 1, **own}
    s = GenerateSettings(generator="inpaint", model=model, steps=STEPS, height=SIZE,
                         width=SIZE, per_triple=2, inpaint=own)
    return RegionInpainter(s, s.section("inpaint"), "cpu", "fp32")


def direct(gen: RegionInpainter, made) -> np.ndarray:
    """The same pair by calling the diffusers pipeline itself (image and mask as PIL)."""
    p = made.plan.params
    with torch.no_grad():
        return gen.pipe(prompt=made.plan.triple["output"], image=to_pil(made.source),
                        mask_image=mask_pil(made.mask), height=SIZE, width=SIZE,
                        strength=p["strength"], guidance_scale=p["guidance"],
                        num_inference_steps=STEPS, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(made.plan.seed)
                        ).images[0]


def photo_png(path, size: int = SIZE) -> None:
    """A room drawn with PIL: a floor, a wall, a table."""
    im = Image.new("RGB", (size, size), (200, 190, 170))
    d = ImageDraw.Draw(im)
    d.rectangle([0, size * 2 // 3, size, size], fill=(120, 80, 40))
    d.rectangle([size // 4, size // 2, size * 3 // 4, size * 2 // 3], fill=(90, 60, 30))
    im.save(path)


def use_photo(gen, tmp_path, size: int = SIZE) -> dict:
    """A photo record (core/schema.Photo) with its prepared PNG, given to the generator."""
    from dsbuild.core.photos import load_photo

    photo_png(tmp_path / "p.png", size)
    rec = {"id": "ph1", "path": "p.png", "image": "p.png", "width": size, "height": size,
           "caption": CAPTION, "license": "CC-BY-4.0", "source": "test"}

    class Root:  # what load_photo reads of a build: its root folder
        root = tmp_path

    gen.sources.use_photos({rec["id"]: rec}, lambda p: load_photo(Root, p))
    return rec


def test_pairs_equal_the_pipeline_called_directly_and_composite_keeps_the_outside():
    raw = inpainter(composite=False)
    plans = [p for t in TRIPLES for p in raw.plan(t)]
    assert {p.triple["id"] for p in plans} == {"t-rm", "t-add"}  # change: not an operation
    made = list(raw.generate(plans))
    assert sorted(m.plan.id for m in made) == sorted(p.id for p in plans)
    assert {m.plan.params["pipeline"] for m in made} == {SD_INPAINT}
    for m in made:
        assert m.mask.shape == (SIZE, SIZE) and m.mask.any() and not m.mask.all()
        np.testing.assert_allclose(m.target, direct(raw, m), atol=1e-5)
    # "add a plant" names no place: the default region, recorded as such
    add = next(m for m in made if m.plan.triple["id"] == "t-add")
    assert add.plan.params["mask_from"] == "default"
    np.testing.assert_array_equal(add.mask, default_mask(SIZE, SIZE, (0.25, 0.25, 0.75, 0.75)))

    kept = inpainter(composite=True)
    for m, r in zip(kept.generate([p for t in TRIPLES for p in kept.plan(t)]), made,
                    strict=True):
        assert m.plan.seed == r.plan.seed and m.plan.params["composite"]
        out = ~m.mask
        # tolerance 0: outside the mask the pair is the source, on the PNG's grid
        assert np.array_equal(m.target[out], m.source[out])
        assert np.array_equal(np.round(m.target * 255)[out], np.round(m.source * 255)[out])
        np.testing.assert_allclose(m.target[m.mask], direct(kept, m)[m.mask], atol=1e-5)
        # without compositing the tiny 9-channel model changes the outside (no guarantee)
        assert np.abs(r.target[out] - r.source[out]).mean() > 0.01


def test_a_four_channel_pipeline_holds_the_source_latents_outside_the_mask():
    """Without compositing, what holds is the pipeline's latent blend: outside the mask (at the
    latent grid) the final latents are the source's, whatever the prompt."""
    pipe = load_inpaint_pipeline("tiny", quiet=True)
    assert pipe.unet.config.in_channels == 4
    image = np.round(np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255) / 255
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[8:24, 8:24] = True  # on the latent grid (the tiny VAE downsamples x2)

    def latents(prompt: str):
        with torch.no_grad():
            return pipe(prompt=[prompt], image=to_pil(image), mask_image=mask_pil(mask),
                        height=SIZE, width=SIZE, strength=1.0, guidance_scale=7.5,
                        num_inference_steps=3, output_type="latent",
                        generator=[torch.Generator("cpu").manual_seed(3)]).images[0]

    a, b = latents("a red vase"), latents("a blue sofa on a rug")
    inside = torch.zeros(a.shape[-2:], dtype=torch.bool)
    inside[4:12, 4:12] = True
    torch.testing.assert_close(a[:, ~inside], b[:, ~inside], atol=1e-6, rtol=0)
    assert (a[:, inside] - b[:, inside]).abs().mean() > 1e-3


def test_region_mask_from_the_referred_phrases():
    assert referred_by_rules("add a vase on the dining table") == ["dining table"]
    assert referred_by_rules("replace the sofa with a leather couch") == ["sofa"]
    gen = inpainter(dilate=3)
    image = np.round(np.random.RandomState(1).rand(SIZE, SIZE, 3) * 255) / 255
    found = gen.segmenter.mask(to_pil(image), ["dining table"])
    mask, origin = gen.region(image, "add a vase on the dining table")
    if found.any():
        assert origin == "segment"
        np.testing.assert_array_equal(mask, dilate_mask(found, 3))
        assert mask.sum() >= found.sum() and (mask | found).sum() == mask.sum()
    else:
        assert origin == "default"
    mask, origin = gen.region(image, "add a plant")
    assert origin == "default" and mask.sum() == (SIZE // 2) ** 2
    one = np.zeros((9, 9), dtype=bool)
    one[4, 4] = True
    assert dilate_mask(one, 2).sum() == 25 and dilate_mask(one, 0).sum() == 1


def test_pipeline_class_from_model_index_of_a_saved_folder(tmp_path):
    pipe = load_inpaint_pipeline("tiny-inpaint", quiet=True)
    pipe.save_pretrained(tmp_path / "inp")
    assert inpaint_pipeline_class(str(tmp_path / "inp")) == SD_INPAINT
    again = load_inpaint_pipeline(str(tmp_path / "inp"))
    assert again.unet.config.in_channels == 9
    fill = tmp_path / "fill"
    fill.mkdir()
    (fill / "model_index.json").write_text(json.dumps({"_class_name": FLUX_FILL}))
    assert inpaint_pipeline_class(str(fill)) == FLUX_FILL
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert inpaint_pipeline_class(str(sd)) == SD_INPAINT  # SD: the latent-blend inpainting
    ip2p = tmp_path / "ip2p"
    ip2p.mkdir()
    (ip2p / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionInstructPix2PixPipeline"}')
    with pytest.raises(DsbuildError) as e:
        inpaint_pipeline_class(str(ip2p))
    assert "generate.model" in str(e.value) and "\n" not in str(e.value)


def test_inpaint_and_editor_on_a_photo_use_the_photo_pixel_equal(tmp_path):
    from dsbuild.generate.generators.editor.generator import InstructionEditor

    triple = {**TRIPLES[0], "id": "t-photo", "photo_id": "ph1"}

    gen = inpainter(composite=True)
    use_photo(gen, tmp_path)
    photo = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    made = list(gen.generate(gen.plan(triple)))
    assert made
    for m in made:
        assert np.array_equal(np.round(m.source * 255).astype("uint8"), photo)
        assert m.record == {"photo_id": "ph1"}
        out = ~m.mask
        assert np.array_equal(np.round(m.target * 255).astype("uint8")[out], photo[out])
    assert gen.stats()["sources_made"] == 0 and gen.stats()["photos_used"] >= 1

    s = GenerateSettings(generator="editor", model="tiny-ip2p", steps=STEPS, height=SIZE,
                         width=SIZE, per_triple=2)
    ed = InstructionEditor(s, s.section("editor"), "cpu", "fp32")
    use_photo(ed, tmp_path)
    made = list(ed.generate(ed.plan(triple)))
    assert made
    for m in made:
        assert np.array_equal(np.round(m.source * 255).astype("uint8"), photo)
        assert m.record == {"photo_id": "ph1"}
    assert ed.stats()["sources_made"] == 0

    small = tmp_path / "small"
    small.mkdir()
    wrong = inpainter()
    use_photo(wrong, small, SIZE // 2)
    with pytest.raises(DsbuildError, match="not generate.width x height"):
        list(wrong.generate(wrong.plan(triple)))


def dsbuild(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSBUILD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DSBUILD_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "dsbuild", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_masked_pair_exports_with_edit_mask(tmp_path, mini_recipe):
    import pyarrow.parquet as pq

    b = tmp_path / "b"
    r = dsbuild("run", b, "--recipe", mini_recipe, "--offline", "--per-agent", "1",
                "--set", "generate.generator=inpaint", "--set", "generate.model=tiny-inpaint",
                "--set", "generate.inpaint.operations=[add,remove,replace,change]")
    assert r.returncode == 0, r.stdout + r.stderr
    pairs = {json.loads(line)["id"]: json.loads(line)
             for f in sorted((b / "pairs").glob("r*.jsonl"))
             for line in f.read_text().splitlines() if line.strip()}
    assert pairs and {p["generator"] for p in pairs.values()} == {"inpaint"}
    rows = [row for f in sorted((b / "export" / "data").glob("*.parquet"))
            for row in pq.read_table(f).to_pylist()]
    edits = [row for row in rows if not row["no_change"]]
    assert edits
    for row in edits:
        pair = pairs[row["pair_id"]]
        assert row["inpaint_pipeline"] == SD_INPAINT
        assert row["mask_from"] == pair["params"]["mask_from"]
        assert row["inpaint_strength"] == pytest.approx(pair["params"]["strength"])
        with Image.open(b / pair["images"]["mask"]) as im:
            want = np.asarray(im.convert("L"))
        with Image.open(io.BytesIO(row["edit_mask"]["bytes"])) as im:
            assert np.array_equal(np.asarray(im.convert("L")), want)
        assert want.any()


def test_region_edits_of_a_photo_build_keep_the_photo(tmp_path, mini_recipe):
    """Through the sources stage: the pair's input is the prepared photo, pixel-equal, the
    output is the photo outside the mask, and the export's region rows carry licence and
    edit_mask."""
    import pyarrow.parquet as pq

    photos = tmp_path / "photos"
    photos.mkdir()
    lines = []
    for i in range(2):
        photo_png(photos / f"p{i}.png", 64)
        im = Image.open(photos / f"p{i}.png")
        ImageDraw.Draw(im).ellipse([8 + 20 * i, 4, 30 + 20 * i, 20], fill=(250, 240, 200))
        im.save(photos / f"p{i}.png")
        lines.append(json.dumps({"image": f"p{i}.png", "caption": CAPTION, "license": "CC0",
                                 "source": "drawn"}))
    (photos / "captions.jsonl").write_text("\n".join(lines) + "\n")
    b = tmp_path / "b"
    r = dsbuild("run", b, "--recipe", mini_recipe, "--offline", "--per-agent", "1",
                "--set", f"sources.path={photos}", "--set", "generate.generator=inpaint",
                "--set", "generate.model=tiny-inpaint")
    assert r.returncode == 0, r.stdout + r.stderr
    prepared = {json.loads(line)["id"]: json.loads(line)
                for f in sorted((b / "photos").glob("r*.jsonl"))
                for line in f.read_text().splitlines() if line.strip()}
    pairs = [json.loads(line) for f in sorted((b / "pairs").glob("r*.jsonl"))
             for line in f.read_text().splitlines() if line.strip()]
    assert pairs and all(p.get("photo_id") in prepared for p in pairs)

    def pixels(rel: str) -> np.ndarray:
        with Image.open(b / rel) as im:
            return np.asarray(im.convert("RGB"))

    for p in pairs:
        photo = pixels(prepared[p["photo_id"]]["image"])
        with Image.open(b / p["images"]["mask"]) as im:
            mask = np.asarray(im.convert("L")) > 127
        assert np.array_equal(pixels(p["images"]["input"]), photo)
        assert np.array_equal(pixels(p["images"]["output"])[~mask], photo[~mask])
    rows = [row for f in sorted((b / "export" / "data").glob("*.parquet"))
            for row in pq.read_table(f).to_pylist() if not row["no_change"]]
    assert rows and all(row["license"] == "CC0" and row["edit_mask"] for row in rows)


def test_a_build_of_photos_never_loads_the_source_model(tmp_path):
    """Every triple from a photo: the source text-to-image model is never loaded (on a GPU
    that is a whole SD checkpoint for nothing), and nothing was cut at its token limit."""
    from dsbuild.core.quiet import CUT_STAT, LIMIT_STAT
    from dsbuild.generate.generators.source import SourceImages
    from dsbuild.generate.settings import GenerateSettings

    s = GenerateSettings(model="tiny", height=16, width=16, steps=2)
    photo = np.full((16, 16, 3), 128 / 255)  # on the PNG grid, as a prepared photo is
    src = SourceImages(s, "a-model-that-does-not-exist", 2, 7.5, "fp32", "cpu",
                       "generate.inpaint.source_model")
    src.use_photos({"p1": {"id": "p1", "image": "photos/img/p1.png"}}, lambda rec: photo)
    out = src.make([("a room", 0, "p1")])
    assert np.array_equal(out[0], photo) and src._pipe is None
    assert src.cut_stats() == {CUT_STAT: 0} and LIMIT_STAT not in src.cut_stats()
    with pytest.raises(Exception, match="a-model-that-does-not-exist"):
        src.make([("a room", 0)])  # a generated source loads it, and names the setting's model
