"""The MagicBrush suite on tiny local copies of both its layouts (the unzipped test folder and
the Hub's parquet columns): its L1/L2/CLIP-I/DINO equal a re-implementation of the suite's
published formulas (torchvision transforms, a tiny DINO v1 ``ViTModel`` saved to disk, the tiny
open_clip model), single-turn edits start from the ground truth and the multi-turn chain from
the model's own outputs, both layouts give the same rows and scores, and a folder in neither
layout is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("datasets")
pytest.importorskip("torchvision")

from PIL import Image  # noqa: E402
from suite_copies import magicbrush_test_folder  # noqa: E402

from dsbuild.core.errors import DsbuildError  # noqa: E402

# img_id -> instructions; stored out of img_id order to show the suite sorts sessions
SESSIONS = {"30": ["paint the wall green"],
            "139": ["make the sofa blue", "add a lamp on the table"]}
# ground truths keep their own size; edits are 32x32. Not square, so the edits' resize to the
# truth's size and DINO's resize 256 + centre crop 224 (an odd excess) are both exercised
TRUTH_SIZE = (48, 41)


def _test_folder(root: Path) -> Path:
    """The unzipped test zip (tests/suite_copies.py), ground truths bigger than the edits."""
    return magicbrush_test_folder(root, SESSIONS, TRUTH_SIZE)


def _hub_folder(root: Path, test: Path) -> Path:
    """The Hub layout of the same sessions: data/dev-*.parquet with the Hub's columns, rows
    with turn 2 before turn 1 (order is the suite's job)."""
    import datasets

    cols = {c: [] for c in ("img_id", "turn_index", "source_img", "mask_img", "instruction",
                            "target_img")}
    for sid, turns in json.loads((test / "edit_sessions.json").read_text()).items():
        for k, t in reversed(list(enumerate(turns, 1))):
            im = test / "images" / sid

            def cell(name, im=im):  # the PNG's bytes, as a Hub parquet holds them
                return {"bytes": (im / name).read_bytes(), "path": None}

            for c, v in (("img_id", sid), ("turn_index", k), ("source_img", cell(t["input"])),
                         ("mask_img", cell(t["mask"])), ("instruction", t["instruction"]),
                         ("target_img", cell(t["output"]))):
                cols[c].append(v)
    ds = datasets.Dataset.from_dict(cols, features=datasets.Features({
        "img_id": datasets.Value("string"), "turn_index": datasets.Value("int32"),
        "source_img": datasets.Image(), "mask_img": datasets.Image(),
        "instruction": datasets.Value("string"), "target_img": datasets.Image()}))
    (root / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "data" / "dev-00000-of-00001.parquet"))
    return root


def _tiny_vit(folder: Path) -> Path:
    """A tiny DINO v1-shaped ViTModel (224 px, patch 16, as facebook/dino-vits16) on disk."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(11)
    model = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).eval()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def _settings(dino: Path):
    from dsbuild.evaluate.settings import EvalSettings

    return EvalSettings(steps=2, suite_resolution=32, suite_clip_model="tiny",
                        suite_dino_model=str(dino), batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both layouts, the tiny ViT and one run of the tiny editor on each layout."""
    from dsbuild.evaluate.suites.run import run_suites

    root = tmp_path_factory.mktemp("magicbrush")
    test = _test_folder(root / "test")
    hub = _hub_folder(root / "hub", test)
    dino = _tiny_vit(root / "dino-v1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = {name: run_suites(["tiny"], ["magicbrush"], root / f"ev-{name}", _settings(dino),
                                sources={"magicbrush": str(src)})
               for name, src in (("test", test), ("hub", hub))}
    finally:
        torch.set_num_threads(n)
    return {"test": test, "hub": hub, "dino": dino, "res": res}


def _entry(runs, layout="test") -> dict:
    return runs["res"][layout]["suites"]["magicbrush"]["models"]["tiny"]


# rows in img_id order ("139" < "30"): 0 = 139 turn 1, 1 = 139 turn 2, 2 = 30 turn 1
ROW_TRUTH = ["139/139-output1.png", "139/139-output2.png", "30/30-output1.png"]


def _reference(edits: list[Path], truths: list[Path], dino_dir: Path) -> dict[str, np.ndarray]:
    """MagicBrush's per-pair formulas, written from its paper and evaluation script."""
    import open_clip
    import torch.nn.functional as F
    from torchvision import transforms
    from transformers import ViTModel

    from dsbuild.models import RANDOM_SEED
    from dsbuild.models.clip import register_tiny_clip

    to_tensor = transforms.ToTensor()
    l1, l2 = [], []
    for e, t in zip(edits, truths, strict=True):
        gt = Image.open(t).convert("RGB")
        gen = Image.open(e).convert("RGB").resize(gt.size)  # PIL's default: bicubic
        a, b = to_tensor(gen), to_tensor(gt)
        l1.append(float(torch.nn.L1Loss()(a, b)))
        l2.append(float(torch.nn.MSELoss()(a, b)))
    with torch.random.fork_rng(devices=[]):  # the tiny CLIP's seeded random weights
        torch.manual_seed(RANDOM_SEED)
        clip, _, preprocess = open_clip.create_model_and_transforms(register_tiny_clip(),
                                                                    pretrained=None)
    vit = ViTModel.from_pretrained(dino_dir).eval()
    dino_tf = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def both(paths):
        ims = [Image.open(p).convert("RGB") for p in paths]
        with torch.no_grad():
            c = clip.eval().encode_image(torch.stack([preprocess(i) for i in ims]))
            d = vit(pixel_values=torch.stack([dino_tf(i) for i in ims])).last_hidden_state[:, 0]
        return c, d

    (c0, d0), (c1, d1) = both(edits), both(truths)
    return {"l1": np.array(l1), "l2": np.array(l2),
            "clip_i": F.cosine_similarity(c0, c1).numpy(),
            "dino": F.cosine_similarity(d0, d1).numpy()}


def test_scores_equal_magicbrush_formulas_single_turn_and_final_turn(runs):
    entry = _entry(runs)
    edits = Path(entry["edits"])
    gt = runs["test"] / "images"
    truths = [gt / t for t in ROW_TRUTH]
    single = [edits / "edits" / f"{i:05d}.png" for i in range(3)]
    chain = [single[0], edits / "iter" / "00001.png", single[2]]
    assert sorted(p.name for p in (edits / "iter").iterdir()) == ["00001.png"]
    with Image.open(single[0]) as im:
        assert im.size == (32, 32)  # edited at the suite resolution, scored at the truth's

    one = _reference(single, truths, runs["dino"])
    multi = _reference(chain, truths, runs["dino"])
    got = entry["metrics"]
    for k in ("l1", "l2", "clip_i", "dino"):
        assert got[k] == pytest.approx(float(one[k].mean()), abs=1e-5), k
        # final turns: 139's turn 2 (chain) and 30's only turn
        assert got[f"final_{k}"] == pytest.approx(float(multi[k][[1, 2]].mean()), abs=1e-5), k
        cats = entry["categories"]
        assert cats["turn 1"][f"final_{k}"] == pytest.approx(float(multi[k][[0, 2]].mean()),
                                                             abs=1e-5)
        assert cats["turn 2"][f"final_{k}"] == pytest.approx(float(multi[k][1]), abs=1e-5)
    assert {c: v["rows"] for c, v in cats.items()} == {"turn 1": 2, "turn 2": 1}
    assert entry["pairs"] == {"single_turn": 3, "final_turn": 2}
    # the two settings' turn-2 edits differ, so the metrics tell them apart
    assert abs(one["l1"][1] - multi["l1"][1]) > 1e-4
    res = runs["res"]["test"]
    assert res["edited"] == {"tiny": 4}
    sec = res["suites"]["magicbrush"]
    assert sec["headline"] == "final_dino" and sec["split"] == "edit_sessions.json (the test zip)"
    assert sec["backbones"]["dino_preprocess"] == "magicbrush"
    md = (Path(entry["edits"]).parents[1] / "report.md").read_text()
    assert "final DINO" in md and "Per multi-turn turn" in md and "test split" in md


def test_turn_two_edits_start_from_ground_truth_and_from_the_chain(runs, one_torch_thread):
    """Re-run the tiny editor the runner's way (batches of 2, row i seeded seed + i): the
    single-turn turn 2 from the ground truth of turn 1, the chain's turn 2 from its own
    turn-1 PNG."""
    from dsbuild.models import load_editor
    from dsbuild.train.data import fit

    s = _settings(runs["dino"])
    edits = Path(_entry(runs)["edits"])
    pipe = load_editor("tiny", "cpu", "fp32", quiet=True)
    gt = runs["test"] / "images" / "139"
    instr = SESSIONS["139"]

    def edit(images, seeds, prompts):
        gens = [torch.Generator().manual_seed(s.seed + k) for k in seeds]
        with torch.no_grad():
            out = pipe(prompts, image=[fit(Image.open(p).convert("RGB"), 32) for p in images],
                       generator=gens, num_inference_steps=2, guidance_scale=s.guidance,
                       image_guidance_scale=s.main_image_guidance).images
        return [np.asarray(o) for o in out]

    def pixels(p):
        return np.asarray(Image.open(p).convert("RGB"))

    first, single2 = edit([gt / "139-input.png", gt / "139-output1.png"], [0, 1], instr)
    assert np.array_equal(first, pixels(edits / "edits" / "00000.png"))
    assert np.array_equal(single2, pixels(edits / "edits" / "00001.png"))
    (chain2,) = edit([edits / "edits" / "00000.png"], [1], instr[1:])
    assert np.array_equal(chain2, pixels(edits / "iter" / "00001.png"))
    assert not np.array_equal(chain2, single2)


def test_both_layouts_give_the_same_rows_and_scores(runs):
    from dsbuild.evaluate.suites import suite

    su = suite("magicbrush")
    a = su.load(str(runs["test"]), "dev", None)
    b = su.load(str(runs["hub"]), "dev", None)
    assert [(r.key, r.session, r.turn, r.instruction, r.category) for r in a] == [
        ("139-1", "139", 1, "make the sofa blue", "turn 1"),
        ("139-2", "139", 2, "add a lamp on the table", "turn 2"),
        ("30-1", "30", 1, "paint the wall green", "turn 1")]
    assert [(r.key, r.instruction) for r in a] == [(r.key, r.instruction) for r in b]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x.input_image), np.asarray(y.input_image))
        assert np.array_equal(np.asarray(x.truth), np.asarray(y.truth))
        assert x.truth.size == TRUTH_SIZE
    assert np.array_equal(np.asarray(a[1].input_image), np.asarray(a[0].truth))
    assert _entry(runs, "hub")["metrics"] == _entry(runs, "test")["metrics"]
    assert _entry(runs, "hub")["categories"] == _entry(runs, "test")["categories"]
    # a limit keeps whole sessions: never turn 2 without turn 1, at least one session
    assert [r.key for r in su.load(str(runs["test"]), None, 1)] == ["139-1", "139-2"]
    assert [r.key for r in su.load(str(runs["hub"]), "dev", 2)] == ["139-1", "139-2"]
    assert len(su.load(str(runs["test"]), None, 3)) == 3


def test_a_folder_in_neither_layout_is_one_line(runs, tmp_path):
    import datasets

    from dsbuild.evaluate.suites import suite
    from dsbuild.evaluate.suites.run import run_suites

    su = suite("magicbrush")
    wrong = tmp_path / "wrong"
    (wrong / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"image": ["a"], "prompt": ["b"]}).to_parquet(
        str(wrong / "data" / "dev-00000-of-00001.parquet"))
    with pytest.raises(DsbuildError) as e:
        run_suites(["tiny"], ["magicbrush"], tmp_path / "o", _settings(runs["dino"]),
                   sources={"magicbrush": str(wrong)})
    msg = str(e.value)
    assert "\n" not in msg and "edit_sessions.json" in msg
    assert "img_id" in msg and "target_img" in msg and "(it has: image, prompt)" in msg
    assert not (tmp_path / "o").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DsbuildError) as e:
        su.load(str(empty), "dev", None)
    assert "\n" not in str(e.value) and "edit_sessions.json" in str(e.value)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "edit_sessions.json").write_text(json.dumps({"7": [{"input": "7-input.png",
                                                                  "output": "7-output1.png"}]}))
    with pytest.raises(DsbuildError, match="'instruction'"):
        su.load(str(broken), None, None)
    (broken / "edit_sessions.json").write_text(json.dumps({"7": [{
        "input": "7-input.png", "output": "7-output1.png", "instruction": "x"}]}))
    with pytest.raises(DsbuildError) as e:
        su.load(str(broken), None, None)
    assert "\n" not in str(e.value) and "7-input.png" in str(e.value)
