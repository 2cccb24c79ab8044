"""The ``emu-edit`` suite on a tiny local copy in the Hub layout of facebook/emu_edit_test_set
(made here: ``data/<split>-*.parquet`` and a ``save_to_disk`` folder): every metric, overall
and per task, against the InstructPix2Pix formulas of tests/ip2p_reference.py and an L1 in
numpy on the PNGs, the fitted input being what is scored; a missing column; the split option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
datasets = pytest.importorskip("datasets")

from ip2p_reference import ip2p_scores  # noqa: E402

from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.evaluate.settings import EvalSettings  # noqa: E402
from dsbuild.evaluate.suites.run import run_suites  # noqa: E402

# idx, task, instruction, input caption, output caption, image size (w, h)
TEST_ROWS = [
    (11, "add", "add a red ball", "a lawn", "a lawn with a red ball", (32, 32)),
    (12, "add", "add a hat to the man", "a man", "a man wearing a hat", (48, 32)),
    (13, "style", "make it a pencil sketch", "a street", "a pencil sketch of a street", (32, 32)),
    (14, "style", "turn it into a mosaic", "a boat at sea", "", (32, 40)),  # no output caption
    (15, "remove", "remove the cup", "a cup on a desk", "an empty desk", (32, 32)),
    (16, "remove", "take the tree away", "a tree in a field", "an empty field", (32, 32)),
]
VALIDATION_ROWS = [
    (901, "global", "make it night", "a house by day", "a house at night", (32, 32)),
    (902, "texture", "make the wall brick", "a white wall", "a brick wall", (32, 32)),
]
FEATURES = {"instruction": "string", "task": "string", "split": "string", "idx": "int64",
            "hash": "string", "input_caption": "string", "output_caption": "string"}


def emu_split(rows, split: str, drop: str | None = None):
    """A split of the Hub layout: instruction, image, task, split, idx, hash, captions."""
    from PIL import Image

    rng = np.random.default_rng(len(rows))
    cols = {
        "instruction": [r[2] for r in rows],
        "image": [Image.fromarray(rng.integers(0, 255, (r[5][1], r[5][0], 3), dtype=np.uint8))
                  for r in rows],
        "task": [r[1] for r in rows], "split": [split] * len(rows), "idx": [r[0] for r in rows],
        "hash": [f"h{r[0]}" for r in rows], "input_caption": [r[3] for r in rows],
        "output_caption": [r[4] for r in rows],
    }
    feats = {k: datasets.Value(v) for k, v in FEATURES.items()}
    feats["image"] = datasets.Image()
    if drop:
        cols.pop(drop)
        feats.pop(drop)
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def hub_folder(root: Path, drop: str | None = None) -> Path:
    """The Hub repo's files: ``data/test-00000-of-00001.parquet`` and the validation one."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in (("test", TEST_ROWS), ("validation", VALIDATION_ROWS)):
        emu_split(rows, split, drop).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


SETTINGS = EvalSettings(steps=2, suite_resolution=32, suite_clip_model="tiny",
                        suite_dino_model="tiny", batch_size=3)


def reference(folder: Path, rows) -> list[dict]:
    """Per row, from the PNGs alone: the tiny CLIP's raw embeddings through the InstructPix2Pix
    formulas, DINO's CLS token of last_hidden_state (MagicBrush preprocessing), L1 in numpy."""
    from PIL import Image

    from dsbuild.models import ClipEncoder
    from dsbuild.models.dino import magicbrush_processor, tiny_dino

    clip = ClipEncoder.load("tiny", "none", device="cpu", quiet=True)
    dino_model, _ = tiny_dino()
    proc = magicbrush_processor()
    out = []
    for i, r in enumerate(rows):
        x = Image.open(folder / "inputs" / f"{i:05d}.png").convert("RGB")
        e = Image.open(folder / "edits" / f"{i:05d}.png").convert("RGB")
        with torch.no_grad():
            ci = clip.model.encode_image(torch.stack([clip.preprocess(x), clip.preprocess(e)]))
            ct = clip.model.encode_text(clip.tokenizer([r[3], r[4] or "-"]))
            cls = dino_model(pixel_values=proc(images=[x, e], return_tensors="pt")
                             ["pixel_values"]).last_hidden_state[:, 0].double().numpy()
        ci, ct = ci.double().numpy(), ct.double().numpy()
        s = ip2p_scores(ci[0], ci[1], ct[0], ct[1])
        a, b = (np.asarray(im, dtype=np.float64) / 255 for im in (x, e))
        out.append({"clip_im": float(s["clip_sim_image"]),
                    "clip_dir": float(s["clip_sim_dir"]) if r[4] else None,
                    "clip_out": float(s["clip_sim_1"]) if r[4] else None,
                    "dino": float(cls[0] @ cls[1] / np.linalg.norm(cls[0])
                                  / np.linalg.norm(cls[1])),
                    "l1": float(np.abs(a - b).mean())})
    return out


def rgb_png(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def mean_of(vals: list[dict], key: str) -> float:
    got = [v[key] for v in vals if v[key] is not None]
    return sum(got) / len(got)


def test_emu_edit_metrics_per_task_match_the_reference_formulas(tmp_path, one_torch_thread):
    from dsbuild.train.data import fit

    src = hub_folder(tmp_path / "emu")
    res = run_suites(["tiny"], ["emu-edit"], tmp_path / "ev", SETTINGS,
                     sources={"emu-edit": str(src)})
    entry = res["suites"]["emu-edit"]
    assert (entry["split"], entry["rows"], entry["headline"]) == ("test", 6, "clip_dir")
    assert entry["backbones"]["dino_preprocess"] == "magicbrush"
    got = entry["models"]["tiny"]
    folder = Path(got["edits"])
    # the scored input is the fitted one, the image the model edited
    ds = datasets.load_dataset(str(src))["test"]
    for i, rec in enumerate(ds):
        want = np.asarray(fit(rec["image"].convert("RGB"), 32))
        assert np.array_equal(np.asarray(rgb_png(folder / "inputs" / f"{i:05d}.png")), want)
    ref = reference(folder, TEST_ROWS)
    m = got["metrics"]
    for key in ("clip_dir", "clip_im", "clip_out", "l1", "dino"):
        assert m[key] == pytest.approx(mean_of(ref, key), abs=1e-5), key
    assert (m["rows"], m["rows_with_captions"], got["rows_without_captions"]) == (6, 5, 1)
    assert set(got["categories"]) == {"add", "style", "remove"}
    for task in ("add", "style", "remove"):
        rows = [v for v, r in zip(ref, TEST_ROWS, strict=True) if r[1] == task]
        cat = got["categories"][task]
        assert cat["rows"] == 2
        for key in ("clip_dir", "clip_im", "clip_out", "l1", "dino"):
            assert cat[key] == pytest.approx(mean_of(rows, key), abs=1e-5), (task, key)
    assert got["categories"]["style"]["rows_with_captions"] == 1
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "## emu-edit: Emu Edit test set" in md and "Per task (CLIP_dir ↑)" in md
    # CLIP_dir printed as a raw cosine, CLIP_im x100
    assert f"{m['clip_dir']:.4f}" in md and f"{100 * m['clip_im']:.2f}" in md


def test_emu_edit_split_option_reads_validation_from_a_saved_copy(tmp_path, one_torch_thread):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": emu_split(TEST_ROWS, "test"),
                          "validation": emu_split(VALIDATION_ROWS, "validation")}
                         ).save_to_disk(str(saved))
    res = run_suites(["tiny"], ["emu-edit"], tmp_path / "ev", SETTINGS,
                     sources={"emu-edit": str(saved)}, splits={"emu-edit": "validation"})
    entry = res["suites"]["emu-edit"]
    assert (entry["split"], entry["rows"]) == ("validation", 2)
    assert set(entry["models"]["tiny"]["categories"]) == {"global", "texture"}
    assert "--suite-split emu-edit=validation" in entry["protocol"]
    with pytest.raises(DsbuildError, match="no split 'dev'"):
        run_suites(["tiny"], ["emu-edit"], tmp_path / "ev2", SETTINGS,
                   sources={"emu-edit": str(saved)}, splits={"emu-edit": "dev"})


def test_emu_edit_missing_column_is_one_line_naming_it(tmp_path):
    src = hub_folder(tmp_path / "emu", drop="output_caption")
    with pytest.raises(DsbuildError) as err:
        run_suites(["tiny"], ["emu-edit"], tmp_path / "ev", SETTINGS,
                   sources={"emu-edit": str(src)})
    msg = str(err.value)
    assert "\n" not in msg and "lacks column(s) output_caption" in msg and "[test]" in msg
    assert not (tmp_path / "ev").exists()  # nothing edited before the rows were checked
