"""Filter stage: tiny real open_clip + DINOv2 models, thresholds, top-k, resume, bad images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import make_build, score_records
from ip2p_reference import ip2p_scores
from PIL import Image

from dsbuild.core import metrics
from dsbuild.core.build import Build
from dsbuild.core.errors import DsbuildError, StageFailed
from dsbuild.filter.settings import FilterSettings
from dsbuild.filter.stage import Scorer, decide, run_filter
from dsbuild.models.clip import ClipEncoder, tiny_clip
from dsbuild.models.dino import DinoEncoder, tiny_dino

TINY = ["filter.clip_model=tiny", "filter.dino=true", "filter.dino_model=tiny"]
LOOSE = ["filter.clip_sim_0=-1", "filter.clip_sim_1=-1", "filter.clip_sim_dir=-1",
         "filter.clip_sim_image=-1"]


@pytest.fixture(scope="module")
def encoders():
    clip = ClipEncoder.load("tiny", quiet=True)
    dino = DinoEncoder.load("tiny", quiet=True)
    return clip, dino


def scorer_of(encoders, batch_size=32) -> Scorer:
    return Scorer(encoders[0], encoders[1], batch_size=batch_size, workers=2)


def built(mini_build, samples=3, overrides=TINY + LOOSE) -> tuple[Build, dict]:
    recs = make_build(mini_build, samples=samples, scores=False)
    mini_build.update(overrides)
    return mini_build, recs


def by_pair(build: Build) -> dict[str, dict]:
    return {r["pair_id"]: r for r in build.records("filter")}


def assert_same_scores(got: dict[str, dict], want: dict[str, dict]) -> None:
    """Same pairs, same keep/reason/rank; scores equal up to float noise (BLAS results shift
    in the last digit with the batch's make-up, which differs between a resumed run and not)."""
    assert got.keys() == want.keys()
    for pid, w in want.items():
        g = got[pid]
        assert g.keys() == w.keys(), pid
        for k, v in w.items():
            if isinstance(v, float):
                assert g[k] == pytest.approx(v, abs=1e-5), (pid, k)
            else:
                assert g[k] == v, (pid, k)


# ---------------------------------------------------------------- encoders and loaders
def test_tiny_clip_encoder_normalised_and_registered(encoders):
    import open_clip

    clip, _ = encoders
    assert "dsbuild-tiny-clip" in open_clip.list_models()
    e = clip.encode_text(["a red chair", "a blue chair", "a red chair"])
    assert e.shape == (3, 32) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(e[0], e[2]) and not torch.allclose(e[0], e[1])


def test_clip_checkpoint_file_loads_through_the_real_loader(tmp_path):
    model, preprocess, tok = tiny_clip(seed=1)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    enc = ClipEncoder.load("tiny", str(ckpt), device="cpu", quiet=True)
    with torch.no_grad():
        want = metrics.normalize(model.encode_text(tok(["a green sofa"])))
    assert torch.allclose(enc.encode_text(["a green sofa"]), want, atol=1e-6)
    random = ClipEncoder.load("tiny", "none", device="cpu", quiet=True)
    assert not torch.allclose(random.encode_text(["a green sofa"]), want, atol=1e-3)


def test_clip_local_dir_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from dsbuild.models.clip import TINY_CLIP_CONFIG

    model, _, tok = tiny_clip(seed=2)
    d = tmp_path / "clipdir"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              d / "open_clip_model.safetensors")
    enc = ClipEncoder.load(f"local-dir:{d}", None, device="cpu", quiet=True)
    with torch.no_grad():
        want = metrics.normalize(model.encode_text(tok(["a rug"])))
    assert torch.allclose(enc.encode_text(["a rug"]), want, atol=1e-6)


def test_dino_saved_to_disk_loads_with_from_pretrained(tmp_path):
    model, proc = tiny_dino(seed=3)
    model.save_pretrained(tmp_path / "dino")
    proc.save_pretrained(tmp_path / "dino")
    enc = DinoEncoder.load(str(tmp_path / "dino"), device="cpu", quiet=True)
    img = Image.new("RGB", (40, 48), (200, 30, 30))
    x = enc.preprocess_image(img)[None]
    with torch.no_grad():
        want = metrics.normalize(model(pixel_values=proc(images=img, return_tensors="pt")
                                       ["pixel_values"]).pooler_output)
    assert torch.allclose(enc.encode_pixels(x), want, atol=1e-5)


def test_bad_model_names_are_clear_errors(tmp_path):
    with pytest.raises(DsbuildError, match="not an open_clip model name"):
        ClipEncoder.load("ViT-Nope-99", "openai", device="cpu")
    with pytest.raises(DsbuildError, match="neither a checkpoint file nor a pretrained tag"):
        ClipEncoder.load("ViT-B-32", "no-such-tag", device="cpu")
    with pytest.raises(DsbuildError, match="dino_model"):
        DinoEncoder.load(str(tmp_path / "missing-dir"), device="cpu")


# ---------------------------------------------------------------- decisions (pure)
def rec(pid, s0=0.3, s1=0.3, d=0.3, im=0.8):
    return {"pair_id": pid, "triple_id": "t", "clip_sim_0": s0, "clip_sim_1": s1,
            "clip_sim_dir": d, "clip_sim_image": im}


def test_decide_thresholds_reasons_and_top_k():
    s = FilterSettings(top_k=2)
    rows = [rec("a", d=0.5), rec("b", d=0.9), rec("c", d=0.3), rec("d", im=0.69),
            rec("e", d=0.1, s0=0.1), rec("f", s1=0.19), rec("g", s0=0.19),
            {"pair_id": "h", "triple_id": "t", "error": "missing_image: x.png"}]
    out = {r["pair_id"]: r for r in decide(rows, s)}
    assert rows[0] == rec("a", d=0.5)  # inputs untouched
    assert [out[k]["rank"] for k in "bac"] == [1, 2, 3]
    assert out["b"]["keep"] and out["a"]["keep"] and not out["c"]["keep"]
    assert out["c"]["reason"] == "top_k" and out["b"]["reason"] is None
    assert out["d"]["reason"] == "clip_sim_image" and out["d"]["rank"] is None
    assert out["e"]["reason"] == "clip_sim_dir" and out["e"]["failed"] == ["clip_sim_dir",
                                                                           "clip_sim_0"]
    assert out["f"]["reason"] == "clip_sim_1" and out["g"]["reason"] == "clip_sim_0"
    assert out["h"] == {"pair_id": "h", "triple_id": "t", "clip_sim_0": None,
                        "clip_sim_1": None, "clip_sim_dir": None, "clip_sim_image": None,
                        "keep": False, "reason": "missing_image: x.png", "rank": None,
                        "failed": []}
    # a threshold exactly met passes (>=), ties in clip_sim_dir break by pair id
    tie = decide([rec("z", d=0.2, im=0.7), rec("y", d=0.2)], FilterSettings(top_k=1))
    assert [(r["pair_id"], r["rank"], r["keep"]) for r in tie] == [("z", 2, False),
                                                                  ("y", 1, True)]
    # re-deciding written records gives the same answer (resume relies on it)
    again = decide(list(out.values()), s)
    assert {r["pair_id"]: r for r in again} == out


def test_dino_min_threshold():
    s = FilterSettings(dino_min=0.5)
    out = decide([rec("a") | {"dino": 0.4}, rec("b") | {"dino": 0.6}], s)
    assert out[0]["reason"] == "dino" and out[1]["keep"]


# ---------------------------------------------------------------- the stage
def test_filter_stage_scores_every_pair_and_writes_report(mini_build, encoders):
    build, recs = built(mini_build, overrides=TINY + LOOSE + ["filter.top_k=2"])
    res = run_filter(build, scorer=scorer_of(encoders), quiet=True)
    assert res.records == 18 and not res.skipped
    scores = by_pair(build)
    assert set(scores) == {p["id"] for p in recs["pairs"]}
    for r in scores.values():
        for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image", "dino"):
            assert -1.0001 <= r[k] <= 1.0001
    # top-k per triple, ranked by clip_sim_dir
    for t in recs["triples"]:
        rows = sorted((scores[p["id"]] for p in recs["pairs"] if p["triple_id"] == t["id"]),
                      key=lambda r: r["rank"])
        assert [r["keep"] for r in rows] == [True, True, False]
        assert rows[0]["clip_sim_dir"] >= rows[1]["clip_sim_dir"] >= rows[2]["clip_sim_dir"]
        assert rows[2]["reason"] == "top_k"
    # one pair recomputed by hand: the encoders, then InstructPix2Pix's formulas in numpy
    clip, dino = encoders
    p = recs["pairs"][4]
    t = next(t for t in recs["triples"] if t["id"] == p["triple_id"])
    ims = [Image.open(build.root / p["images"][s]).convert("RGB") for s in ("input", "output")]
    ie = clip.encode_pixels(torch.stack([clip.preprocess_image(i) for i in ims])).numpy()
    te = clip.encode_text([t["input"], t["output"]]).numpy()
    de = dino.encode_pixels(torch.stack([dino.preprocess_image(i) for i in ims])).double().numpy()
    want = ip2p_scores(ie[0], ie[1], te[0], te[1])
    want["dino"] = de[0] @ de[1] / (np.linalg.norm(de[0]) * np.linalg.norm(de[1]))
    for k, v in want.items():
        assert scores[p["id"]][k] == pytest.approx(float(v), abs=1e-5), k
    # tests/builders.py, which other stages' tests build on, writes what this stage writes
    real = scores[p["id"]]
    built_like = score_records(build, [p], [real["clip_sim_dir"]])[0]
    assert set(built_like) == set(real) - {"dino"} and "dino" in real
    # report
    rep = json.loads((build.reports_dir / "filter.json").read_text())
    assert rep["overall"]["pairs"] == 18 and rep["overall"]["kept"] == 12
    assert set(rep["per_agent"]) == {"chairs", "living-room"}
    assert rep["overall"]["thresholds"]["clip_sim_dir"]["rate"] == 1.0
    assert rep["overall"]["dropped_by_top_k"] == 6
    with Image.open(build.reports_dir / "filter.png") as im:
        assert im.size[0] > 400
    with Image.open(build.reports_dir / "filter_agents.png") as im:
        assert im.size[0] > 400
    assert "| chairs | 9 | 6 |" in (build.reports_dir / "filter.md").read_text()
    # done: a re-run skips without loading a model
    assert run_filter(build, scorer=None).skipped


def test_thresholds_from_settings_reject_with_reason(mini_build, encoders):
    build, _ = built(mini_build, overrides=TINY + LOOSE + ["filter.clip_sim_image=1.01"])
    # nothing kept is an empty output: exit 1, no marker, the report written to say why
    with pytest.raises(StageFailed, match=r"filter kept 0 of 18 pairs \(clip_sim_image=18\);"
                       r" no completion marker written; see .*filter\.md; every pair missed a "
                       r"threshold.*--set filter\.clip_sim_image=VALUE"):
        run_filter(build, scorer=scorer_of(encoders), quiet=True)
    assert not build.is_complete("filter")
    partial = build.output_dir("filter") / "r00000.jsonl.partial"
    scores = {r["pair_id"]: r for r in map(json.loads, partial.read_text().splitlines())}
    assert len(scores) == 18
    assert all(not r["keep"] and r["reason"] == "clip_sim_image" for r in scores.values())
    rep = json.loads((build.reports_dir / "filter.json").read_text())
    assert rep["overall"]["thresholds"]["clip_sim_image"]["rate"] == 0.0
    assert rep["reasons"] == {"clip_sim_image": 18}


def test_shared_images_encoded_once(mini_build, encoders):
    build, recs = built(mini_build)
    # two pairs of a triple share one input file; a third pair's output is a byte copy
    p0, p1, p2 = recs["pairs"][:3]
    (build.root / p2["images"]["output"]).write_bytes(
        (build.root / p1["images"]["output"]).read_bytes())
    for p in recs["pairs"][1:3]:
        p["images"]["input"] = p0["images"]["input"]
    build.run_stage("generate", 0, 1, lambda w: [w.write(p) for p in recs["pairs"]] and None,
                    force=True, report=False)
    sc = scorer_of(encoders)
    run_filter(build, scorer=sc, quiet=True)
    assert sc.images.encoded == 36 - 3  # 36 image slots, 2 shared inputs + 1 duplicate output
    scores = by_pair(build)
    assert p1["triple_id"] == p2["triple_id"]
    for k in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image", "dino"):
        assert scores[p1["id"]][k] == scores[p2["id"]][k]


def test_missing_and_unreadable_images_get_reasons(mini_build, encoders):
    build, recs = built(mini_build)
    missing, broken = recs["pairs"][0], recs["pairs"][4]
    (build.root / missing["images"]["output"]).unlink()
    (build.root / broken["images"]["input"]).write_bytes(b"not a png")
    run_filter(build, scorer=scorer_of(encoders), quiet=True)
    scores = by_pair(build)
    m, b = scores[missing["id"]], scores[broken["id"]]
    assert m["reason"] == f"missing_image: {missing['images']['output']}"
    assert b["reason"].startswith(f"unreadable_image: {broken['images']['input']} (")
    for r in (m, b):
        assert r["keep"] is False and r["rank"] is None and r["clip_sim_dir"] is None
        assert r["dino"] is None
    ok = [r for pid, r in scores.items() if pid not in (missing["id"], broken["id"])]
    assert all(r["clip_sim_dir"] is not None for r in ok) and any(r["keep"] for r in ok)
    rep = json.loads((build.reports_dir / "filter.json").read_text())
    assert rep["overall"]["image_errors"] == 2
    assert rep["reasons"]["missing_image"] == 1 and rep["reasons"]["unreadable_image"] == 1


def test_no_image_left_is_exit_1_with_the_count_and_the_report(mini_build, capsys,
                                                               monkeypatch):
    """rm pairs/img/*/*.png; dsbuild filter B: exit 1 naming the count and the report, no
    marker, and the same command (the images still gone) fails the same way."""
    from dsbuild import models
    from dsbuild.cli import main

    monkeypatch.setattr(models, "_LOADED", {})  # the encoders it loads are not kept after

    build, _ = built(mini_build, overrides=[])
    for png in build.images_dir.glob("*/*.png"):
        png.unlink()
    for _ in range(2):
        with pytest.raises(SystemExit) as exc:
            main(["filter", str(build.root), "--set", "filter.clip_model=tiny"])
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: filter kept 0 of 18 pairs (missing_image=18); no "
                              "completion marker written; see ")
        assert f"{build.reports_dir / 'filter.md'}" in err and "repair" in err
        assert not build.marker_dir("filter").exists() and not build.is_complete("filter")
    rep = json.loads((build.reports_dir / "filter.json").read_text())
    assert rep["overall"]["pairs"] == 18 and rep["overall"]["image_errors"] == 18


class CrashingScorer(Scorer):
    """A real scorer that dies on its n-th call, as a killed worker would."""

    def __init__(self, *a, crash_at: int = 2, **kw):
        super().__init__(*a, **kw)
        self.calls, self.scored, self.crash_at = 0, 0, crash_at

    def score(self, pairs, triples, root):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("killed")
        self.scored += len(pairs)
        return super().score(pairs, triples, root)


def test_resume_after_crash_and_mid_triple(tmp_path, mini_recipe, encoders):
    from dsbuild.core.config import load_recipe

    def fresh(name):
        b = Build.init(tmp_path / name, load_recipe(mini_recipe))
        make_build(b, samples=3, scores=False)
        # clip_sim_dir=0: tiny CLIP's directions fall on both sides, so the re-ranking of a
        # resumed triple sees threshold misses, top-k drops and kept pairs (none kept would
        # be an empty output, a StageFailed)
        b.update(TINY + ["filter.clip_sim_image=-1", "filter.clip_sim_0=-1",
                         "filter.clip_sim_1=-1", "filter.clip_sim_dir=0", "filter.top_k=2",
                         "filter.batch_size=1"])
        return b

    ref = fresh("ref")
    run_filter(ref, scorer=scorer_of(encoders, 1), quiet=True, report=False)
    want = by_pair(ref)
    assert {r["reason"] for r in want.values()} >= {None, "clip_sim_dir"}

    b = fresh("crash")
    crash = CrashingScorer(encoders[0], encoders[1], batch_size=1, workers=1)
    with pytest.raises(KeyboardInterrupt):
        run_filter(b, scorer=crash, quiet=True)
    partial = b.root / "scores" / "r00000.jsonl.partial"
    lines = partial.read_text().splitlines()
    assert len(lines) == crash.scored == 6 and not b.is_complete("filter")
    # cut mid-triple with a torn last line, as a kill during a write would
    partial.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    again = CrashingScorer(encoders[0], encoders[1], batch_size=1, workers=1, crash_at=0)
    res = run_filter(b, scorer=again, quiet=True, report=False)
    assert again.scored == 18 - 4 and res.records == 18
    assert_same_scores(by_pair(b), want)


def test_sharded_by_triple_matches_single_rank(tmp_path, mini_recipe, encoders):
    from dsbuild.core.config import load_recipe

    results = {}
    for ws in (1, 2):
        b = Build.init(tmp_path / f"ws{ws}", load_recipe(mini_recipe))
        make_build(b, samples=3, scores=False)
        b.update(TINY + LOOSE + ["filter.top_k=1"])
        for r in range(ws):
            run_filter(b, r, ws, scorer=scorer_of(encoders), quiet=True)
        assert b.is_complete("filter") and (b.reports_dir / "filter.json").exists()
        results[ws] = by_pair(b)
    assert_same_scores(results[2], results[1])


def test_filter_cli_with_tiny_models(mini_build, capsys):
    from dsbuild.cli import main

    build, _ = built(mini_build, overrides=[])
    # tiny CLIP's scores are noise: caption thresholds off, or nothing is kept (exit 1)
    main(["filter", str(build.root), "--set", "filter.clip_model=tiny",
          "--set", "filter.clip_sim_image=0.5", *(f"--set=filter.{k}=-1" for k in
                                                  ("clip_sim_0", "clip_sim_1", "clip_sim_dir"))])
    out = capsys.readouterr()
    assert "filter rank 0/1: done, 18 records" in out.out
    assert "placeholder" in out.err
    assert Build.open(build.root).config.filter.clip_model == "tiny"
    with pytest.raises(SystemExit) as exc:
        main(["filter", str(build.root), "--force", "--set", "filter.clip_model=ViT-Nope"])
    assert exc.value.code == 2
    assert "not an open_clip model name" in capsys.readouterr().err


def test_bench_filter_encodes_what_it_claims_in_the_time_it_took(monkeypatch):
    """Each path really encodes every image once per repeat (counted at open_clip's own
    encode_image, which still runs), and the reported rates are not slower than the time the
    call took: each path ran twice, each run at least its best time."""
    import time

    import open_clip
    from click.testing import CliRunner

    from dsbuild.bench.filter import bench_filter

    encoded: list[int] = []
    real_encode = open_clip.model.CLIP.encode_image

    def counting(self, image, *a, **kw):
        encoded.append(image.shape[0])
        return real_encode(self, image, *a, **kw)

    monkeypatch.setattr(open_clip.model.CLIP, "encode_image", counting)
    args = ["--model", "tiny", "--batch-size", "4", "--images", "10", "--repeats", "2",
            "--workers", "2", "--resolution", "64", "--json"]
    start = time.perf_counter()
    r = CliRunner().invoke(bench_filter, args)
    wall = time.perf_counter() - start
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert (res["images"], res["batch_size"], res["repeats"]) == (10, 4, 2)
    # a 4-image warm-up, then 3 paths x 2 repeats x 10 images, in batches of at most 4
    assert sum(encoded) == 4 + 3 * 2 * 10 and max(encoded) == 4
    ips = res["images_per_s"]
    assert set(ips) == {"raw", "dsbuild", "encode_only"} and min(ips.values()) > 0
    assert 2 * sum(10 / v for v in ips.values()) <= wall


def test_caption_cache_bound_keeps_lookups_working(encoders):
    """Clearing the bounded text cache never drops a caption the same call needs."""
    sc = scorer_of(encoders)
    first = sc.texts(["a red velvet armchair"])["a red velvet armchair"]
    sc.text_cache.update({f"filler {i}": first for i in range(100_001)})
    out = sc.texts(["a red velvet armchair", "a never seen caption"])
    assert set(out) == {"a red velvet armchair", "a never seen caption"}
    assert torch.allclose(out["a red velvet armchair"], first, atol=1e-5)  # batch noise
