"""Issue 27's "done when": the photo recipe from a folder of photos to an export, from the shell.

`dsbuild run B --recipe recipes/interior-design-photos.yaml --offline --set sources.path=PHOTOS`
on six PIL photos with a captions.jsonl (tiny models) runs sources → captions → generate (P2P
through inversion, and a region edit) → filter → verify → export; the export's input images
are the photos, rows carry their licence and the P2P rows their reconstruction PSNR, the
region rows their edit_mask. Also: a recipe's own settings start a build, under --set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dsbuild.core.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "interior-design-photos.yaml"
CAPTIONS = [
    "a modern living room with a grey sofa and a coffee table",
    "a bright living room with an armchair and a floor lamp",
    "a cosy bedroom with a double bed and a dresser",
    "a minimalist bedroom with a wardrobe and a rug",
    "a white kitchen with a kitchen island and bar stools",
    "a farmhouse kitchen with open shelves and a range cooker",
]


def _photos(folder: Path) -> Path:
    """Six rooms drawn with PIL: four at the demo's 64 px (kept pixel for pixel), two larger
    (centre-cropped and resized); two of unknown licence."""
    folder.mkdir()
    rng = np.random.RandomState(1)
    with open(folder / "captions.jsonl", "w") as f:
        for i, caption in enumerate(CAPTIONS):
            size = (64, 64) if i < 4 else (96, 80)
            im = Image.new("RGB", size, tuple(int(x) for x in rng.randint(60, 220, 3)))
            draw = ImageDraw.Draw(im)
            for _ in range(4):
                x, y = rng.randint(0, 48, 2)
                draw.rectangle([x, y, x + rng.randint(8, 16), y + rng.randint(8, 16)],
                               fill=tuple(int(v) for v in rng.randint(0, 255, 3)))
            im.save(folder / f"room{i}.png")
            f.write(json.dumps({"image": f"room{i}.png", "caption": caption,
                                "license": None if i % 3 == 0 else "cc-by-4.0",
                                "source": "test library", "attribution": "dsbuild tests"})
                    + "\n")
    return folder


def _cli(*args) -> tuple[int, str]:
    from click.testing import CliRunner

    from dsbuild.cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.output + (repr(r.exception) if r.exception and r.exit_code else "")


@pytest.fixture(scope="module")
def photo_build(tmp_path_factory):
    base = tmp_path_factory.mktemp("photo-run")
    photos = _photos(base / "photos")
    out = base / "B"
    code, output = _cli("run", out, "--recipe", RECIPE, "--offline",
                        "--set", f"sources.path={photos}")
    assert code == 0, output
    return out, photos, output


def test_the_photo_recipe_runs_every_stage_to_an_export(photo_build):
    out, _, output = photo_build
    for stage in ("sources", "captions", "generate", "filter", "verify", "export"):
        assert any(line.startswith(stage) and " done " in line for line in output.splitlines()), (
            stage, output)
    assert "6 photos kept" in output


def test_export_rows_start_from_the_photos_with_their_provenance(photo_build, tmp_path):
    import datasets

    out, photos, _ = photo_build
    records = [json.loads(line) for line in (out / "photos" / "r00000.jsonl").open()]
    by_id = {r["id"]: r for r in records}
    sidecar = {json.loads(line)["image"]: json.loads(line)
               for line in (photos / "captions.jsonl").open()}
    rows = [r for split in datasets.load_dataset(
        str(out / "export"), cache_dir=str(tmp_path / "cache")).values() for r in split]
    assert rows
    made = [r for r in rows if not r["no_change"]]
    assert {r["generator"] for r in made} == {"p2p", "inpaint"}
    for r in rows:
        photo = by_id[r["photo_id"]]  # every row starts from a photo
        given = sidecar[Path(photo["path"]).name]
        assert r["license"] == given["license"] and r["source"] == "test library"
        assert r["original_prompt"] == photo["caption"]
        prepared = np.asarray(Image.open(out / photo["image"]).convert("RGB"))
        got = np.asarray(r["input_image"].convert("RGB"))
        assert np.array_equal(got, prepared)
        if (photo["width"], photo["height"]) == (64, 64):  # no resize needed: the file itself
            original = np.asarray(Image.open(photos / Path(photo["path"]).name).convert("RGB"))
            assert np.array_equal(got, original)
    p2p = [r for r in made if r["generator"] == "p2p"]
    region = [r for r in made if r["generator"] == "inpaint"]
    assert p2p and all(isinstance(r["reconstruction_psnr"], float) and r["reconstruction_psnr"] > 0
                       for r in p2p)
    assert region and all(r["edit_mask"] is not None for r in region)
    assert all(r["reconstruction_psnr"] is None for r in region)
    card = (out / "export" / "README.md").read_text()
    assert "## Provenance" in card and "unknown licence" in card


def test_a_recipe_s_settings_start_the_build_under_set(tmp_path):
    recipe = load_recipe(RECIPE)
    assert "generate.samples_room=12" in recipe.setting_overrides()
    code, output = _cli("init", tmp_path / "B", "--recipe", RECIPE,
                        "--set", "generate.samples_room=5", "--set", "generate.model=tiny",
                        "--set", "verify.detector=tiny", "--set", "filter.clip_model=tiny")
    assert code == 0, output
    from dsbuild.core.build import Build

    cfg = Build.open(tmp_path / "B").config
    assert cfg.generate.samples_room == 5  # --set wins
    assert cfg.captions.photos.per_photo == 4  # from the recipe
    assert [m["generator"] for m in cfg.generate.mix] == ["inpaint"]
    # the recipe's settings sign in their sections, not as the recipe
    assert "settings" not in Build.open(tmp_path / "B").signed_input("recipe")
