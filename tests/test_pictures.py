"""Pictures that label themselves, checked without OCR or golden images: every grid records
its text layer in the PNG (``dsbuild.core.grid.TEXT_KEY``); these tests read it and check that
the header band is drawn (its pixel rows are not the background), captions are wrapped at word
boundaries rather than cut, no label prints ``None``, verify's rejects draw the checked region
in red, and the eval curve is in the table's scale."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from builders import TRIPLES, make_build
from PIL import Image

from dsbuild.core.grid import BACKGROUND, ELLIPSIS, Row, font, grid, set_params, text_layer, wrap
from dsbuild.core.records import write_image

LONG = ("chairs", "object", "change",
        "a mid-century modern lounge armchair in cognac leather with a walnut shell, brass "
        "feet and a matching ottoman standing by a tall window with linen curtains",
        "make the leather upholstery of the lounge armchair an emerald green velvet",
        "a mid-century modern lounge armchair in emerald green velvet with a walnut shell, "
        "brass feet and a matching ottoman standing by a tall window with linen curtains")


def labels(layer: dict) -> list[str]:
    """Every text a grid drew: title, headers, captions and notes, as given and as drawn."""
    out = [layer["title"], *layer["title_lines"], *layer["headers"], layer["text_header"]]
    out += [x for h in layer["header_lines"] for x in h]
    for r in layer["rows"]:
        out += [r["caption"], *r["caption_lines"], *r["notes"]]
        out += [x for n in r["note_lines"] for x in n]
    return [x for x in out if x]


def assert_labelled(path, headers: list[str] | None = None) -> dict:
    """The PNG's text layer has its header row, drawn in a band that is not the background,
    captions wrapped (every word kept, in order, no drawn line wider than its column) and no
    ``None`` anywhere; returns the layer."""
    layer = text_layer(path)
    assert layer, f"{path}: no text layer"
    if headers is not None:
        assert layer["headers"] == headers
    assert layer["headers"] and all(layer["headers"])
    y0, y1 = layer["header_band"]
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    band = arr[y0:y1]
    assert (np.abs(band - BACKGROUND).max(-1) > 0).all(-1).all(), "a header row is background"
    assert (band.max(-1) < 100).any(), "no ink in the header band"
    fnt = font()
    for r in layer["rows"]:
        drawn = r["caption_lines"]
        assert [w for line in drawn for w in line.split()] == r["caption"].split(), drawn
        assert all(fnt.getlength(line) <= layer["caption_width"] for line in drawn
                   if len(line.split()) > 1)
    for text in labels(layer):
        assert "None" not in text, text
    return layer


def test_grid_wraps_at_words_grows_and_ellipsizes(tmp_path):
    im = Image.new("RGB", (32, 32), (40, 90, 160))
    caption = " ".join(LONG[3:])
    g = grid([Row(caption, [im, im]), Row("short", [im, None], [caption, "x"])], cell=64,
             title="a model: the title", headers=["input", "output"], note_lines=2)
    write_image(tmp_path / "g.png", g)
    layer = assert_labelled(tmp_path / "g.png", ["input", "output"])
    assert layer["title"] == "a model: the title"
    long_row, short_row = layer["rows"]
    assert len(long_row["caption_lines"]) >= 4  # wrapped onto more lines; the row grew
    assert short_row["caption_lines"] == ["short"]
    # the note is capped at two lines: it ends with "…" after a whole word of the text
    note = short_row["note_lines"][0]
    assert len(note) == 2 and note[-1].endswith(ELLIPSIS)
    kept = " ".join(note)[:-len(ELLIPSIS)].split()
    assert kept == caption.split()[:len(kept)]
    assert wrap("one two three", 10_000) == ["one two three"]
    assert set_params({"cross": None, "steps": 2, "words": [], "mode": "self"}) == \
        "steps=2 mode=self"


def test_generate_contact_sheets_are_paged_per_agent(mini_build):
    from dsbuild.generate.report import PAGE_ROWS, SHEET_DIR, write_report

    b = mini_build
    make_build(b, samples=6, triples=[LONG, *TRIPLES], scores=False)
    (b.reports_dir / "generate_contact_sheet.png").parent.mkdir(parents=True, exist_ok=True)
    (b.reports_dir / "generate_contact_sheet.png").write_bytes(b"the old one-image sheet")
    b.update(["generate.contact_sheet=12"])
    rep = write_report(b)
    folder = b.reports_dir / SHEET_DIR
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "chairs-p2.png", "chairs.png", "living-room-p2.png", "living-room.png"]
    assert not (b.reports_dir / "generate_contact_sheet.png").exists()
    md = (b.reports_dir / "generate.md").read_text()
    for p in rep["contact_sheets"]:
        assert f"({SHEET_DIR}/{p.rsplit('/', 1)[-1]})" in md
    captions = []
    for name, agent, page, rows in (("chairs.png", "chairs", 1, PAGE_ROWS),
                                    ("chairs-p2.png", "chairs", 2, 12 - PAGE_ROWS),
                                    ("living-room.png", "living-room", 1, PAGE_ROWS)):
        layer = assert_labelled(folder / name, ["input", "output"])
        assert (layer["agent"], layer["page"], layer["pages"]) == (agent, page, 2)
        assert f"agent {agent}" in layer["title"] and f"page {page} of 2" in layer["title"]
        assert len(layer["rows"]) == rows
        assert all(c for r in layer["rows"] for c in r["cells"])
        captions += [r for r in layer["rows"]]
    first = captions[0]
    assert first["caption"].startswith(f"“{LONG[4]}”\nin: {LONG[3]}\nout: {LONG[5]}\np2p seed=0")
    # the long input caption needed more than one line, and the row grew past the image
    assert len(first["caption_lines"]) > 4
    assert "blend_words" not in first["caption"]  # unset parameters are not printed
    # fewer pairs per agent: one page each, the second pages of the earlier run gone
    b.update(["generate.contact_sheet=3"])
    write_report(b)
    assert sorted(p.name for p in folder.glob("*.png")) == ["chairs.png", "living-room.png"]


def _red(arr: np.ndarray) -> np.ndarray:
    return (arr[..., 0] > 200) & (arr[..., 1] < 90) & (arr[..., 2] < 90)


def test_verify_rejects_draw_the_checked_region_in_red(mini_build):
    """Three rejects made by verify's own rules: a change (its measured region on both
    images), a remove still there (where the detector saw it, on each image) and an add not
    detected (nothing drawn, and said so); each with its instruction and reason below."""
    from dsbuild.verify.checks import Found, Targets, operation_check, verdict
    from dsbuild.verify.report import PAIR_GAP, THUMB, write_report
    from dsbuild.verify.settings import VerifySettings

    b = mini_build
    recs = make_build(b, samples=1, keep_every=1)
    for p in recs["pairs"]:  # flat colours: no red of their own
        Image.new("RGB", (32, 32), (120, 120, 120)).save(b.root / p["images"]["input"])
        Image.new("RGB", (32, 32), (60, 90, 160)).save(b.root / p["images"]["output"])
    s = VerifySettings()
    change_box = (8.0, 8.0, 20.0, 24.0)
    cases = {  # triple index: (targets, detections on input, on output, change)
        0: (Targets(["red velvet armchair"], ["blue velvet armchair"], "velvet armchair"),
            {"velvet armchair": Found(0.9, 1, change_box)},
            {"velvet armchair": Found(0.9, 1, change_box)},
            {"region_dir": -0.5, "rest": 0.95, "box": list(change_box)}),
        2: (Targets(["armrests"], []), {"armrests": Found(0.9, 1, (2.0, 2.0, 10.0, 10.0))},
            {"armrests": Found(0.8, 1, (20.0, 16.0, 30.0, 30.0))}, None),
        1: (Targets([], ["cushion"]), {}, {"cushion": Found(0.05, 0, (1.0, 1.0, 5.0, 5.0))},
            None),
    }
    vrecs = []
    for i, (t, det_in, det_out, change) in cases.items():
        pair, triple = recs["pairs"][i], recs["triples"][i]
        checks = [operation_check(triple["operation"], t, det_in, det_out, s, change)]
        v, why = verdict(checks)
        vrecs.append({"pair_id": pair["id"], "triple_id": triple["id"],
                      "operation": triple["operation"], "agent": triple["agent"],
                      "targets": t.as_dict(), "checks": checks, "verdict": v, "reason": why})
    assert [r["reason"] for r in vrecs] == ["change_wrong_direction", "remove_still_there",
                                           "add_not_detected"]
    b.run_stage("verify", 0, 1, lambda w: [w.write(r) for r in vrecs] and None, report=False)
    rep = write_report(b, vrecs)
    assert rep["contact_sheet_pairs"] == 3
    path = b.reports_dir / "verify_rejects.png"
    layer = assert_labelled(path)
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = _red(arr)
    rows = {r["caption"].split(":")[0]: r for r in layer["rows"]}
    scale = THUMB / 32

    def reds_in(cell: list[int], side: int, box=None) -> tuple[int, int]:
        """Red pixels of one side of a pair's cell: inside ``box`` (grown by the outline's
        width) and outside it."""
        x0 = cell[0] + side * (THUMB + PAIR_GAP)
        half = red[cell[1]:cell[1] + THUMB, x0:x0 + THUMB]
        inside = np.zeros_like(half)
        if box is not None:
            bx = [round(v * scale) for v in box]
            inside[max(0, bx[1] - 2):bx[3] + 3, max(0, bx[0] - 2):bx[2] + 3] = True
        return int((half & inside).sum()), int((half & ~inside).sum())

    def note(reason: str) -> str:
        return rows[reason]["notes"][0]

    cell = rows["change_wrong_direction"]["cells"][0]
    for side in (0, 1):  # the measured region on both images
        inside, outside = reds_in(cell, side, change_box)
        assert inside > 2 * (change_box[2] - change_box[0]) * scale and outside == 0
    cell = rows["remove_still_there"]["cells"][0]
    assert reds_in(cell, 0, (2, 2, 10, 10))[0] > 0 and reds_in(cell, 0, (2, 2, 10, 10))[1] == 0
    assert reds_in(cell, 1, (20, 16, 30, 30))[0] > 0
    assert reds_in(cell, 1, (20, 16, 30, 30))[1] == 0
    cell = rows["add_not_detected"]["cells"][0]
    assert reds_in(cell, 0) == (0, 0) and reds_in(cell, 1) == (0, 0)
    assert "no region detected" in note("add_not_detected")
    for reason, i in (("change_wrong_direction", 0), ("remove_still_there", 2),
                      ("add_not_detected", 1)):
        assert note(reason).startswith(f"“{recs['triples'][i]['edit']}”\nreject: {reason}")
    assert "region_dir=-0.5" in note("change_wrong_direction")
    assert "armrests: in 0.90, out 0.80" in note("remove_still_there")
    assert "in red" in layer["title"]


@pytest.fixture(scope="module")
def trained_and_evaluated(tmp_path_factory):
    """A model trained one step (a validation grid at step 1) on a tiny export, and ``eval``
    of it over an image-guidance sweep (grid, table, curve)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("open_clip")
    pytest.importorskip("datasets")
    import torch
    from click.testing import CliRunner
    from test_train import build_export

    from dsbuild.cli import cli
    from dsbuild.train.settings import TrainSettings
    from dsbuild.train.trainer import train

    root = tmp_path_factory.mktemp("pictures")
    export = build_export(root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainSettings(data=str(export), base="tiny", resolution=32, batch_size=2,
                            max_steps=1, validate_every=1, validation_steps=2,
                            validation_rows=2), root / "model")
        r = CliRunner().invoke(cli, ["eval", str(root / "model"), "--data", str(export),
                                     "--out", str(root / "ev"), "--image-guidance", "1.0,1.5",
                                     "--offline", "--steps", "2", "--resolution", "32"])
    finally:
        torch.set_num_threads(n)
    assert r.exit_code == 0, r.output
    return root / "model", root / "ev"


def test_train_validation_grid_has_headers_and_the_model(trained_and_evaluated):
    model, _ = trained_and_evaluated
    layer = assert_labelled(model / "validation" / "step-000001.png",
                            ["input", "edit (ig=1.5)", "truth"])
    assert layer["title"].startswith("tiny + full on local:export") and "step 1" in layer["title"]
    assert len(layer["rows"]) == 2 and all(r["caption"] for r in layer["rows"])


def test_eval_grid_headers_and_curve_in_the_tables_scale(trained_and_evaluated):
    from dsbuild.evaluate.report import curve_figure

    model, out = trained_and_evaluated
    (grid_png,) = out.glob("grid-*.png")  # one model, one grid
    layer = assert_labelled(grid_png, ["input", "ig=1.0", "ig=1.5", "truth"])
    assert layer["title"].startswith("local:model: text guidance 7.5, 2 steps")
    # the curve's points are the sweep table's numbers (CLIP_im ×100, CLIP_dir a raw cosine),
    # and its axes say so
    result = json.loads((out / "eval.json").read_text())
    md = (out / "eval.md").read_text().split("Image-guidance sweep")[1]
    table = {float(m[1]): (m[2], m[3]) for m in re.finditer(
        r"^\| local:model \| ([\d.]+) \| (-?[\d.]+) \| (-?[\d.]+) \|$", md, re.M)}
    assert sorted(table) == [1.0, 1.5]
    fig = curve_figure(result)
    ax = fig.axes[0]
    assert "×100" in ax.get_xlabel() and "raw cosine" in ax.get_ylabel()
    (line,) = ax.get_lines()
    assert line.get_label() == "local:model"
    drawn = {ig: (f"{y:.4f}", f"{x:.2f}") for ig, x, y in
             zip((1.0, 1.5), line.get_xdata(), line.get_ydata(), strict=True)}
    assert drawn == table
    assert (out / "curve.png").exists()
