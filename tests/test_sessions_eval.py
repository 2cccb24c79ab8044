"""dsbuild eval --turns (MagicBrush's multi-turn protocol) and training on every turn, on a
session export made here with `datasets`: a 2-turn chain and a tree (one turn-1 node with two
children), plus a single edit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("datasets")

from test_train import dsbuild, error_lines  # noqa: E402

from dsbuild.cli import cli  # noqa: E402

EVAL = ["--offline", "--steps", "2", "--resolution", "32", "--batch-size", "1", "--json"]
# (run, node, parent, turn, instruction); the chain is run "a", the tree run "b"
NODES = [("a", "a1", None, 1, "make the sofa red"), ("a", "a2", "a1", 2, "add a blue lamp"),
         ("b", "b1", None, 1, "paint the walls green"),
         ("b", "b2", "b1", 2, "add a yellow rug"), ("b", "b3", "b1", 2, "remove the table")]


def _png(path, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, 1, 3))
    arr = np.clip(base + rng.integers(-40, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def session_rows(folder, with_sessions: bool = True) -> list[dict]:
    """Rows as export writes them: a turn's input is its parent's truth (the source at turn
    1), ``source_image`` the run's source; the single edit has no session fields."""
    folder.mkdir(parents=True, exist_ok=True)
    source = {run: _png(folder / f"src-{run}.png", i) for i, run in enumerate("ab")}
    truth, rows = {}, []
    for i, (run, node, parent, turn, edit) in enumerate(NODES):
        truth[node] = _png(folder / f"{node}.png", 10 + i)
        rows.append({"input_image": truth[parent] if parent else source[run],
                     "edit_prompt": edit, "edited_image": truth[node],
                     "original_prompt": "a living room", "edited_prompt": f"a room: {edit}",
                     "no_change": False, "session_id": f"s-{run}", "session_run": f"r-{run}",
                     "turn": turn, "node_id": node, "parent_id": parent,
                     "source_image": source[run]})
    rows.append({"input_image": _png(folder / "single-in.png", 30), "edit_prompt": "add a plant",
                 "edited_image": _png(folder / "single-out.png", 31),
                 "original_prompt": "a bedroom", "edited_prompt": "a bedroom with a plant",
                 "no_change": False, "session_id": None, "session_run": None, "turn": None,
                 "node_id": None, "parent_id": None, "source_image": None})
    if not with_sessions:
        for r in rows:
            for k in ("session_id", "session_run", "turn", "node_id", "parent_id",
                      "source_image"):
                del r[k]
    return rows


def write_export(root, rows) -> str:
    """An export folder (data/<split>-00000.parquet) with both splits holding ``rows``."""
    import datasets

    feats = {"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
             "edited_image": datasets.Image(), "original_prompt": datasets.Value("string"),
             "edited_prompt": datasets.Value("string"), "no_change": datasets.Value("bool")}
    if "session_id" in rows[0]:
        feats |= {k: datasets.Value("string") for k in ("session_id", "session_run",
                                                         "node_id", "parent_id")}
        feats |= {"turn": datasets.Value("int32"), "source_image": datasets.Image()}
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(feats))
    (root / "data").mkdir(parents=True)
    for split in ("train", "test"):
        ds.to_parquet(str(root / "data" / f"{split}-00000.parquet"))
    return str(root)


@pytest.fixture(scope="module")
def export_and_model(tmp_path_factory):
    """The session export and a second tiny InstructPix2Pix (other weights) saved to disk."""
    from dsbuild.models.editor import editor_pipeline, tiny_editor_components

    root = tmp_path_factory.mktemp("turns")
    export = write_export(root / "export", session_rows(root / "png"))
    comps = tiny_editor_components(seed=1)
    sched = comps.pop("scheduler")
    editor_pipeline(scheduler_config=dict(sched.config), **comps).save_pretrained(
        str(root / "other"))
    return export, str(root / "other")


def _px(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255


def test_eval_turns_follows_own_outputs(export_and_model, tmp_path, one_torch_thread):
    from PIL import Image

    from dsbuild.models.clip import ClipEncoder
    from dsbuild.models.dino import DinoEncoder
    from dsbuild.models.editor import load_editor

    export, other = export_and_model
    out = tmp_path / "ev"
    run = ["eval", "tiny", other, "--data", export, "--out", str(out), "--turns", *EVAL]
    r = CliRunner().invoke(cli, run)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["turns"]["runs"] == 2 and res["turns"]["rows"] == {"1": 2, "2": 3}
    assert res["turns"]["final_rows"] == 3 and res["turns"]["skipped"] == 0
    for name in ("tiny", other):
        m = res["models"][name]
        assert set(m["edit"]) >= {"clip_i", "dino_gt", "l1"}  # the single-turn table stays
        assert [m["turns"]["per_turn"][t]["rows"] for t in ("1", "2")] == [2, 3]
        assert m["turns"]["final"]["rows"] == 3
        for scores in (*m["turns"]["per_turn"].values(), m["turns"]["final"]):
            assert all(np.isfinite(scores[k]) for k in ("clip_i", "dino_gt", "l1")), name
    assert res["models"]["tiny"]["turns"] != res["models"][other]["turns"]
    md = (out / "eval.md").read_text()
    assert "Multi-turn (MagicBrush protocol): 2 session runs" in md
    assert "| tiny | 2 | 3 |" in md and "| tiny | final | 3 |" in md
    from dsbuild.core.grid import text_layer

    grid = text_layer(out / "turns-tiny.png")  # one line per leaf: its chain, turn by turn
    assert grid["headers"] == ["source", "turn 1 (own)", "turn 1 truth", "turn 2 (own)",
                               "turn 2 truth"]
    assert [r["caption"] for r in grid["rows"]] == [
        "1: make the sofa red; 2: add a blue lamp", "1: paint the walls green; 2: add a yellow "
        "rug", "1: paint the walls green; 2: remove the table"]

    # turn 2 edits the model's own turn-1 output: the same call by hand gives the same image,
    # and it is not the edit of the ground-truth input (the single-turn edit of that row)
    single = out / "edits" / res["models"]["tiny"]["edits"].rsplit("/", 1)[-1]
    turns = single / "turns"
    idx = {node: i for i, (_, node, *_) in enumerate(NODES)}
    pipe = load_editor("tiny", quiet=True)
    for node, parent in (("a2", "a1"), ("b3", "b1")):
        with Image.open(single / f"{idx[parent]:05d}.png") as im:
            own_input = im.convert("RGB")
        with torch.no_grad():
            mine = pipe(NODES[idx[node]][4], image=own_input, num_inference_steps=2,
                        guidance_scale=7.5, image_guidance_scale=1.5,
                        generator=torch.Generator().manual_seed(idx[node])).images[0]
        got = _px(turns / f"{idx[node]:05d}.png")
        assert np.abs(np.asarray(mine, dtype=np.float64) / 255 - got).max() <= 1 / 255 + 1e-9
        assert np.abs(got - _px(single / f"{idx[node]:05d}.png")).mean() > 1e-3
    assert not (turns / f"{idx['a1']:05d}.png").exists()  # turn 1 is the single-turn edit

    # turn 2's scores, recomputed: cosines of the encoders' embeddings in float64 numpy, L1 on
    # the PNGs, each own edit against that turn's truth
    clip = ClipEncoder.load("tiny", "none", device="cpu", dtype="fp32", quiet=True)
    dino = DinoEncoder.load("tiny", device="cpu", dtype="fp32", quiet=True)
    two = [idx[n] for n in ("a2", "b2", "b3")]
    edits = [turns / f"{i:05d}.png" for i in two]
    truths = [out / "rows" / f"{i:05d}_truth.png" for i in two]

    def emb(enc, prep, paths):
        x = enc.encode_pixels(torch.stack([prep(Image.open(p).convert("RGB"))
                                           for p in paths])).numpy().astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    got = res["models"]["tiny"]["turns"]["per_turn"]["2"]
    for key, enc, prep in (("clip_i", clip, clip.preprocess),
                           ("dino_gt", dino, dino.preprocess_image)):
        want = (emb(enc, prep, edits) * emb(enc, prep, truths)).sum(1).mean()
        assert got[key] == pytest.approx(want, abs=1e-5), key
    l1 = np.mean([np.abs(_px(e) - _px(t)).mean() for e, t in zip(edits, truths, strict=True)])
    assert got["l1"] == pytest.approx(l1, abs=1e-6)
    # the final turn: the chain's and the tree's leaves (a2, b2, b3) are all turn 2 here
    assert res["models"]["tiny"]["turns"]["final"] == got

    # resumable: a rerun edits nothing; a deleted turn-1 edit is made again and its child too
    pngs = {p: p.stat().st_mtime_ns for p in (out / "edits").rglob("*.png")}
    r2 = CliRunner().invoke(cli, run)
    assert r2.exit_code == 0, r2.output
    assert {p: p.stat().st_mtime_ns for p in pngs} == pngs
    assert json.loads(r2.stdout)["models"] == res["models"]
    (single / f"{idx['a1']:05d}.png").unlink()
    r3 = CliRunner().invoke(cli, run)
    assert r3.exit_code == 0, r3.output
    again = {p for p in pngs if p.stat().st_mtime_ns != pngs[p]}
    assert again == {single / f"{idx['a1']:05d}.png", turns / f"{idx['a2']:05d}.png"}
    assert json.loads(r3.stdout)["models"] == res["models"]


def test_turns_without_sessions_is_one_line(tmp_path, capsys):
    export = write_export(tmp_path / "export", session_rows(tmp_path / "png", False))
    out = tmp_path / "ev"
    code, res = dsbuild(["eval", "tiny", "--data", export, "--out", str(out), "--turns",
                         *EVAL], capsys)
    assert code == 2
    [line] = error_lines(res.err)
    assert "--turns:" in line and "has no session columns (missing: session_id" in line
    assert "captions.sessions.share > 0" in line
    assert not out.exists()


def test_train_reads_every_turn(export_and_model, tmp_path, one_torch_thread):
    from dsbuild.train import data
    from dsbuild.train.settings import TrainSettings
    from dsbuild.train.trainer import train

    export, _ = export_and_model
    rows = data.read_rows(data.load_split(export, "train"))
    assert [(r.node_id, r.parent_id, r.turn, r.session_run) for r in rows] == [
        (node, parent, turn, f"r-{run}") for run, node, parent, turn, _ in NODES] + [
        (None, None, None, None)]
    # a turn-2 row's input is its parent's truth, as export writes it
    assert np.array_equal(np.asarray(rows[1].input_image), np.asarray(rows[0].edited_image))
    res = train(TrainSettings(data=export, base="tiny", resolution=32, batch_size=2,
                              max_steps=1), tmp_path / "model")
    assert res.rows == len(NODES) + 1
