"""dsbuild eval / edit: both models scored on the export's test split, metrics recomputed
independently, no-change rows apart, resumable edits, the trained model's card updated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("datasets")

from ip2p_reference import ip2p_scores  # noqa: E402
from test_train import build_export, dsbuild, error_lines  # noqa: E402

from dsbuild.cli import cli  # noqa: E402
from dsbuild.core.errors import DsbuildError  # noqa: E402

EVAL = ["--offline", "--steps", "2", "--resolution", "32", "--json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The export and a model trained on it for 2 steps."""
    from dsbuild.train.settings import TrainSettings
    from dsbuild.train.trainer import train

    root = tmp_path_factory.mktemp("eval")
    export = build_export(root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(TrainSettings(data=str(export), base="tiny", resolution=32, batch_size=2,
                        max_steps=2), root / "model")
    torch.set_num_threads(n)
    return export, root / "model"


def test_eval_scores_both_models(trained, tmp_path, one_torch_thread):
    import datasets

    export, model = trained
    out = tmp_path / "ev"
    r = CliRunner().invoke(cli, ["eval", "tiny", str(model), "--data", str(export), "--out",
                                 str(out), "--image-guidance", "1.0,1.5", *EVAL])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    test = datasets.load_dataset("parquet", data_files={"test": [
        str(p) for p in (export / "data").glob("test-*.parquet")]})["test"]
    assert res["rows"] == {"edit": sum(not x for x in test["no_change"]),
                           "no_change": sum(test["no_change"])}
    assert res["rows"]["no_change"] >= 1 and res["rows"]["edit"] >= 1
    for name in ("tiny", str(model)):
        m = res["models"][name]
        for key in ("clip_im", "clip_dir", "clip_out", "dino", "clip_i", "dino_gt", "l1"):
            assert np.isfinite(m["edit"][key]), (name, key)
        assert set(m["no_change"]) == {"clip_im", "dino", "l1"}
        assert [p["image_guidance"] for p in m["sweep"]] == [1.0, 1.5]
    assert res["models"]["tiny"]["edit"] != res["models"][str(model)]["edit"]
    for f in ("eval.json", "eval.md", "curve.png", "grid-tiny.png"):
        assert (out / f).exists(), f
    assert "CLIP_dir" in (out / "eval.md").read_text()
    card = (model / "README.md").read_text()
    assert "| tiny |" in card and "Not evaluated yet" not in card

    # recompute the tiny model's scores independently: InstructPix2Pix's formulas in float64
    # numpy on the filter encoders' embeddings, L1 in numpy on the PNGs
    from PIL import Image

    from dsbuild.models.clip import ClipEncoder

    clip = ClipEncoder.load("tiny", "none", device="cpu", dtype="fp32", quiet=True)
    edits = out / "edits"
    folder = next(p for p in edits.iterdir()
                  if p.name.startswith("tiny-") and p.name
                  == res["models"]["tiny"]["edits"].rsplit("/", 1)[-1])
    rows = [i for i, nc in enumerate(test["no_change"]) if not nc]

    def emb(paths):
        return clip.encode_pixels(torch.stack([clip.preprocess(Image.open(p).convert("RGB"))
                                               for p in paths])).numpy()

    x = emb([out / "rows" / f"{i:05d}_input.png" for i in rows])
    e = emb([folder / f"{i:05d}.png" for i in rows])
    t0 = clip.encode_text([test[i]["original_prompt"] for i in rows]).numpy()
    t1 = clip.encode_text([test[i]["edited_prompt"] for i in rows]).numpy()
    ref = ip2p_scores(x, e, t0, t1)
    got = res["models"]["tiny"]["edit"]
    assert got["clip_im"] == pytest.approx(ref["clip_sim_image"].mean(), abs=1e-5)
    assert got["clip_dir"] == pytest.approx(ref["clip_sim_dir"].mean(), abs=1e-5)
    assert got["clip_out"] == pytest.approx(ref["clip_sim_1"].mean(), abs=1e-5)

    def px(p):
        return np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255

    l1 = np.mean([np.abs(px(folder / f"{i:05d}.png") - px(out / "rows" / f"{i:05d}_truth.png"))
                  .mean() for i in rows])
    assert got["l1"] == pytest.approx(l1, abs=1e-6)

    # resumable: a second run edits nothing; a deleted edit is made again, identically
    victim = folder / f"{rows[0]:05d}.png"
    before = victim.read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in edits.rglob("*.png")}
    victim.unlink()
    r2 = CliRunner().invoke(cli, ["eval", "tiny", str(model), "--data", str(export), "--out",
                                  str(out), "--image-guidance", "1.0,1.5", *EVAL])
    assert r2.exit_code == 0, r2.output
    assert victim.read_bytes() == before
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p != victim)
    assert json.loads(r2.stdout)["models"] == res["models"]


def test_edit_cli_and_bad_models(trained, tmp_path, one_torch_thread):
    from PIL import Image

    export, model = trained
    src = tmp_path / "in.png"
    Image.new("RGB", (40, 36), "red").save(src)
    out = tmp_path / "out.png"
    r = CliRunner().invoke(cli, ["edit", str(model), str(src), "make it blue", "--out",
                                 str(out), "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (40, 32)  # rounded down to a multiple of 8

    from diffusers import StableDiffusionPipeline

    from dsbuild.models.editor import load_editor
    from dsbuild.models.sd import tiny_sd_components

    sd = tmp_path / "sd"
    StableDiffusionPipeline(**tiny_sd_components(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(sd))
    with pytest.raises(DsbuildError, match="not an InstructPix2Pix model"):
        load_editor(str(sd))
    with pytest.raises(DsbuildError, match="neither 'tiny', an existing diffusers folder"):
        load_editor("no/such/thing")


def test_eval_refuses_before_writing_and_takes_back_its_rows(trained, tmp_path, capsys,
                                                              monkeypatch, one_torch_thread):
    """--rows 0, a missing model and a locked OUT are refused before anything is written; a
    run that fails after its edits removes the fitted rows it wrote and keeps the edits."""
    import os

    from dsbuild.train.loop import lock_out

    export, model = trained
    out = tmp_path / "ev"
    run = ["--data", str(export), "--out", str(out), *EVAL]
    code, res = dsbuild(["eval", "tiny", *run, "--rows", "0"], capsys)
    assert code == 2 and "Invalid value for '--rows'" in res.err
    assert not out.exists()
    code, res = dsbuild(["eval", "tiny", str(tmp_path / "gone"), *run], capsys)
    assert code == 2
    [line] = error_lines(res.err)
    assert f"{tmp_path / 'gone'}' is neither 'tiny', an existing diffusers folder" in line
    assert not out.exists()
    with lock_out(out, "eval"):
        code, res = dsbuild(["eval", "tiny", *run], capsys)
        assert code == 2
        assert f"the eval run into {out} is being written by PID {os.getpid()}" in \
            error_lines(res.err)[0]
        gen = tmp_path / "evg"
        with lock_out(gen, "eval-generator"):
            code, res = dsbuild(["eval-generator", str(model), "--out", str(gen)], capsys)
            assert code == 2 and f"PID {os.getpid()}" in error_lines(res.err)[0]
    assert not out.exists()

    def no_backbones(s):
        raise DsbuildError("eval backbones: cannot load (offline)")

    monkeypatch.setattr("dsbuild.evaluate.run.load_encoders", no_backbones)
    code, res = dsbuild(["eval", "tiny", *run], capsys)
    assert code == 2 and error_lines(res.err) == ["error: eval backbones: cannot load (offline)"]
    assert not (out / "rows").exists() and not (out / "eval.json").exists()
    assert list((out / "edits").rglob("*.png"))  # finished edits: a rerun resumes from them
