"""The sources stage (issue 27): real photos drawn with PIL into tmp folders, read from a folder
with its captions.jsonl sidecar or from a datasets folder; content ids, exact and near
duplicates, small photos and unknown licences refused with the file named, the crop policy, VLM
captions from a scripted OpenAI-compatible server on 127.0.0.1, kill and resume, a build
without photos signing as before, and provenance reaching the export and its card."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsbuild.core import photos, stages
from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe
from dsbuild.core.errors import DsbuildError
from dsbuild.core.records import read_jsonl
from dsbuild.sources.phash import distance, phash
from dsbuild.sources.stage import run_sources

SIZE = 64  # the generation size of these builds (generate.width = generate.height)


def picture(seed: int, w: int = 96, h: int = 80) -> Image.Image:
    """A photo-like picture: smooth colour blobs, different per seed."""
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (6, 8, 3)).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC)


def sidecar(folder: Path, lines: list[dict | str]) -> None:
    (folder / "captions.jsonl").write_text(
        "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


def cap(name: str, **extra) -> dict:
    return {"image": name, "caption": f"a bright living room, photo {name}", **extra}


def make_build(root: Path, recipe: Path, **sets) -> Build:
    over = [f"generate.height={SIZE}", f"generate.width={SIZE}",
            *(f"sources.{k}={v if isinstance(v, str) else json.dumps(v)}"
              for k, v in sets.items())]
    return Build.init(root, load_recipe(recipe), recipe_path=str(recipe), overrides=over)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@pytest.fixture
def folder(tmp_path):
    """a.png, b.png, c.jpg; a copy of a (exact duplicate), b brightened and saved as JPEG
    (near duplicate), a photo smaller than the generation size; captions for all."""
    d = tmp_path / "photos"
    d.mkdir()
    picture(1).save(d / "a.png")
    picture(2).save(d / "b.png")
    picture(3).convert("RGB").save(d / "c.jpg", quality=95)
    (d / "a_copy.png").write_bytes((d / "a.png").read_bytes())
    bright = np.clip(np.asarray(picture(2)).astype(int) + 6, 0, 255).astype(np.uint8)
    Image.fromarray(bright).save(d / "b_bright.jpg", quality=90)
    picture(4, 40, 40).save(d / "small.png")
    sidecar(d, [cap("a.png", license="cc-by-4.0", attribution="Ann Example"),
                cap("b.png", license="cc0-1.0", source="my-library"), cap("c.jpg"),
                cap("a_copy.png"), cap("b_bright.jpg"), cap("small.png")])
    return d


def test_a_folder_with_its_sidecar_keeps_each_photo_once_and_names_the_refused(
        folder, tmp_path, mini_recipe):
    b = make_build(tmp_path / "b", mini_recipe, path=str(folder), license="proprietary")
    res = run_sources(b)
    recs = {r["path"]: r for r in read_jsonl(b.output_dir("sources") / "r00000.jsonl")}
    assert sorted(Path(p).name for p in recs) == ["a.png", "b.png", "c.jpg"]
    a, bb, c = (recs[str(folder / n)] for n in ("a.png", "b.png", "c.jpg"))
    assert a["id"] == sha(folder / "a.png") and c["id"] == sha(folder / "c.jpg")  # content ids
    assert (a["license"], a["attribution"], a["source"]) == ("cc-by-4.0", "Ann Example", "photos")
    assert (bb["license"], bb["source"]) == ("cc0-1.0", "my-library")
    assert c["license"] == "proprietary"  # sources.license for photos the sidecar gives none
    assert a["caption"] == "a bright living room, photo a.png"
    assert a["caption_source"] == "sidecar" and (a["width"], a["height"]) == (96, 80)
    assert a["phash"] == phash(picture(1))
    refused = res.stats["refused_files"]
    assert refused["duplicate"] == [{"file": str(folder / "a_copy.png"), "of": str(folder / "a.png")}]
    (near,) = refused["near_duplicate"]
    assert near["file"] == str(folder / "b_bright.jpg") and near["of"] == str(folder / "b.png")
    assert near["distance"] <= b.config.sources.phash_distance
    assert refused["small"] == [{"file": str(folder / "small.png"), "size": [40, 40]}]
    assert res.stats["summary"] == ("3 photos kept, 3 refused (duplicate: 1, small: 1, near "
                                    "duplicate: 1)")
    md = (b.reports_dir / "sources.md").read_text()
    for name in ("a_copy.png", "b_bright.jpg", "small.png"):
        assert str(folder / name) in md
    assert json.loads((b.reports_dir / "sources.json").read_text())["photos"] == 3
    # later stages read them through core/photos
    assert photos.has_photos(b)
    by_id = photos.photos_by_id(b)
    assert set(by_id) == {a["id"], bb["id"], c["id"]}
    arr = photos.load_photo(b, by_id[a["id"]])
    assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.float32 and 0 <= arr.min() <= arr.max() <= 1
    assert photos.photo_of(b, {"photo_id": a["id"]}) == by_id[a["id"]]
    assert run_sources(b).skipped  # done: a second run does nothing


def test_a_photo_folder_that_is_not_there_is_refused_before_it_is_saved(tmp_path, mini_recipe):
    with pytest.raises(DsbuildError, match=r"sources\.path: .*nowhere is not a folder"):
        make_build(tmp_path / "b", mini_recipe, path=str(tmp_path / "nowhere"))
    assert not (tmp_path / "b" / "dsbuild.yaml").exists()


def test_near_duplicates_are_kept_when_the_threshold_says_so(folder, tmp_path, mini_recipe):
    assert distance(phash(picture(1)), phash(picture(2))) > 16  # different photos: far apart
    b = make_build(tmp_path / "b", mini_recipe, path=str(folder), phash_distance=-1)
    res = run_sources(b)
    assert res.records == 4 and "near_duplicate" not in res.stats["refused"]


def test_small_photos_stop_the_stage_by_setting(folder, tmp_path, mini_recipe):
    b = make_build(tmp_path / "b", mini_recipe, path=str(folder), small="error")
    with pytest.raises(DsbuildError, match=r"small\.png: 40x40 is smaller than the generation "
                                           r"size 64x64.*sources\.small=skip"):
        run_sources(b)
    assert not b.is_complete("sources")


@pytest.mark.parametrize("fit", ["center-crop", "resize", "pad"])
def test_the_crop_policy_fits_photos_to_the_generation_size(tmp_path, mini_recipe, fit):
    d = tmp_path / "p"
    d.mkdir()
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32] = (255, 0, 0)  # red | green | blue | white quarters
    wide[:, 32:64] = (0, 255, 0)
    wide[:, 64:96] = (0, 0, 255)
    wide[:, 96:] = (255, 255, 255)
    Image.fromarray(wide).save(d / "wide.png")
    exact = np.asarray(picture(7, SIZE, SIZE))
    Image.fromarray(exact).save(d / "exact.png")
    sidecar(d, [cap("wide.png"), cap("exact.png")])
    b = make_build(tmp_path / "b", mini_recipe, path=str(d), fit=fit)
    run_sources(b)
    recs = {Path(r["path"]).name: r for r in b.records("sources")}
    got = np.asarray(Image.open(b.root / recs["wide.png"]["image"]).convert("RGB")).astype(int)
    assert got.shape == (SIZE, SIZE, 3)
    # a photo already at the generation size is the same pixels, whatever the policy
    assert np.array_equal(np.asarray(Image.open(b.root / recs["exact.png"]["image"])), exact)
    mid = got[SIZE // 2]
    if fit == "center-crop":  # the middle half: green then blue, no red or white
        assert (mid[2] == (0, 255, 0)).all() and (mid[-3] == (0, 0, 255)).all()
    elif fit == "resize":  # all four quarters, squeezed
        assert (mid[2] == (255, 0, 0)).all() and (mid[-3] == (255, 255, 255)).all()
    else:  # pad: the whole photo at half height, black bars above and below
        assert (got[2] == 0).all() and (got[-3] == 0).all()
        assert (mid[2] == (255, 0, 0)).all() and (mid[-3] == (255, 255, 255)).all()


@pytest.mark.parametrize("line, match", [
    ("{not json", r"captions\.jsonl:2: not a JSON object"),
    (json.dumps({"image": "nope.png", "caption": "x y z"}), r"captions\.jsonl:2: 'nope\.png' "
     r"is not a photo"),
    (json.dumps({"image": "a.png", "caption": "x y z", "licence": "mit"}),
     r"captions\.jsonl:2: unknown key\(s\) \['licence'\]"),
    (json.dumps({"caption": "x y z"}), r"captions\.jsonl:2: no \"image\""),
    (json.dumps(cap("a.png")), r"captions\.jsonl:2: 'a\.png' is given twice \(first on line 1\)"),
])
def test_a_bad_sidecar_line_is_named_with_its_file_and_line(tmp_path, mini_recipe, line, match):
    d = tmp_path / "p"
    d.mkdir()
    picture(1).save(d / "a.png")
    sidecar(d, [cap("a.png"), line])
    b = make_build(tmp_path / "b", mini_recipe, path=str(d))
    with pytest.raises(DsbuildError, match=match):
        run_sources(b)


def test_offline_a_photo_without_caption_is_an_error_naming_it(folder, tmp_path, mini_recipe):
    picture(9).save(folder / "z.png")  # no sidecar line
    b = make_build(tmp_path / "b", mini_recipe, path=str(folder))
    with pytest.raises(DsbuildError, match=r"1 photo\(s\) have no caption: .*z\.png \(no line in "
                                           r".*captions\.jsonl\); add its caption"):
        run_sources(b)
    assert not b.is_complete("sources")


def test_unknown_licences_are_refused_by_setting(folder, tmp_path, mini_recipe):
    b = make_build(tmp_path / "b", mini_recipe, path=str(folder), require_license=True)
    res = run_sources(b)
    assert sorted(Path(r["path"]).name for r in b.records("sources")) == ["a.png", "b.png"]
    (unknown,) = res.stats["refused_files"]["unknown_license"]
    assert unknown["file"] == str(folder / "c.jpg") and "captions.jsonl:3" in unknown["where"]


def test_a_datasets_folder_with_an_image_column(tmp_path, mini_recipe):
    import datasets

    pics = [picture(s) for s in (11, 12, 13)]
    pics.append(picture(11))  # the same picture again: an exact duplicate
    ds = datasets.Dataset.from_dict(
        {"img": pics, "text": ["a sunny kitchen with a wooden table"] * 4,
         "license": ["cc-by-4.0", None, "cc0-1.0", "cc-by-4.0"]},
        features=datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"),
                                    "license": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    b = make_build(tmp_path / "b", mini_recipe, dataset=str(tmp_path / "ds"),
                   image_column="img", caption_column="text")
    res = run_sources(b)
    recs = list(b.records("sources"))
    assert [r["path"] for r in recs] == [f"dataset:{tmp_path / 'ds'}#{i}" for i in range(3)]
    assert [r["license"] for r in recs] == ["cc-by-4.0", None, "cc0-1.0"]
    assert {r["caption_source"] for r in recs} == {"given"}
    assert recs[0]["source"] == str(tmp_path / "ds")
    assert res.stats["refused"] == {"duplicate": 1}
    b2 = make_build(tmp_path / "b2", mini_recipe, dataset=str(tmp_path / "ds"),
                    image_column="picture")
    with pytest.raises(DsbuildError, match=r"sources\.image_column: .* has no column 'picture'"):
        run_sources(b2)


def test_a_build_without_photos_signs_and_runs_as_before(tmp_path, mini_recipe, folder):
    """No photo source: sources is off (dsbuild run skips it, status says so) and captions
    signs as it did before the stage existed; naming photos signs captions with them and
    makes sources a stage captions needs."""
    from dsbuild.core.hashing import signature

    plain = make_build(tmp_path / "plain", mini_recipe)
    assert not plain.is_active("sources") and plain.active_uses("captions") == ()
    want = signature({"stage": "captions", "settings": plain.stage_settings("captions"),
                      "up": {}})
    assert plain.signature("captions") == want
    assert plain.status()["stages"]["sources"]["active"] is False
    with pytest.raises(DsbuildError, match="stage 'sources' is off"):
        plain.run_stage("sources", 0, 1, lambda w: {})
    with_photos = make_build(tmp_path / "ph", mini_recipe, path=str(folder))
    assert with_photos.required("captions") == ("sources",)
    before = with_photos.signature("captions")
    assert before != want
    with pytest.raises(DsbuildError, match="stage 'sources' has no finished output"):
        with_photos.require_complete("sources")
    run_sources(with_photos)
    assert with_photos.signature("captions") != before  # signed with the photos it reads
    # a photo added to the folder changes the stage's signature (the folder is signed)
    sig = with_photos.signature("sources")
    picture(21).save(folder / "new.png")
    assert with_photos.signature("sources") != sig
    assert "sources" in stages.names() and stages.names()[0] == "sources"


# --- VLM captions through the shared client --------------------------------------------------


def _vlm_build(tmp_path, recipe, folder, url, **extra) -> Build:
    return make_build(tmp_path / "b", recipe, path=str(folder), base_url=url, model="test-vlm",
                      timeout=2, retry_backoff=0.01, max_retries=1, concurrency=2, **extra)


@pytest.mark.server
def test_vlm_captions_good_bad_and_no_replies(tmp_path, mini_recipe):
    from openai_server import OpenAIServer, chat, error

    d = tmp_path / "p"
    d.mkdir()
    for i, name in enumerate(("good.png", "empty.png", "short.png", "down.png", "given.png")):
        picture(30 + i).save(d / name)
    sidecar(d, [cap("given.png")])
    ids = {sha(d / n): n for n in ("good.png", "empty.png", "short.png", "down.png")}
    answers = {"good.png": chat("Caption: a cosy bedroom with a grey bed and a wooden floor"),
               "empty.png": chat("   "), "short.png": chat("sorry"),
               "down.png": error(500, "vlm crashed")}
    seen: list[str] = []

    def handler(body, n):
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        import base64
        import io

        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
            assert im.size == (SIZE, SIZE)  # the prepared photo is what the VLM sees
            arr = np.asarray(im.convert("RGB"))
        name = next(n for pid, n in ids.items()
                    if np.array_equal(arr, np.asarray(Image.open(
                        tmp_path / "b" / "photos" / "img" / f"{pid}.png").convert("RGB"))))
        seen.append(name)
        return answers[name]

    with OpenAIServer(handler=handler) as srv:
        b = _vlm_build(tmp_path, mini_recipe, d, srv.base_url)
        res = run_sources(b)
        recs = {Path(r["path"]).name: r for r in b.records("sources")}
        assert sorted(recs) == ["given.png", "good.png"]
        assert recs["good.png"]["caption"] == "a cosy bedroom with a grey bed and a wooden floor"
        assert recs["good.png"]["caption_source"] == "vlm"
        assert recs["given.png"]["caption_source"] == "sidecar"  # given captions are used as is
        why = {Path(f["file"]).name: f["why"] for f in res.stats["refused_files"]["caption"]}
        assert why["empty.png"] == "empty reply"
        assert why["short.png"].startswith("not a caption ('sorry'")
        assert why["down.png"].startswith("no reply")
        assert res.stats["refused"] == {"caption": 3}
        assert res.stats["requests"]["failed"] == 1 and seen.count("down.png") == 2  # retried
        assert "given.png" not in seen
        sent = len(srv.requests)
        # rerun from scratch: replies received are reused from the cache, failures asked again
        res2 = run_sources(b, force=True)
        assert res2.records == 2 and res2.stats["requests"]["cached"] == 3
        assert seen[-2:] == ["down.png", "down.png"] and len(srv.requests) == sent + 2


@pytest.mark.server
def test_a_killed_run_resumes_and_redoes_nothing_written(tmp_path, mini_recipe):
    from openai_server import OpenAIServer, chat

    d = tmp_path / "p"
    d.mkdir()
    for i in range(5):
        picture(40 + i).save(d / f"p{i}.png")
    sidecar(d, [cap("p0.png"), cap("p1.png")])  # p2..p4 are captioned by the VLM
    with OpenAIServer(handler=lambda body, n: chat(f"a quiet study with a desk, answer {n}")
                      ) as srv:
        b = _vlm_build(tmp_path, mini_recipe, d, srv.base_url)
        paused = tmp_path / "paused.json"  # the writer stops after its 3rd record until killed
        env = {**__import__("os").environ, "DSBUILD_NO_PROGRESS": "1",
               "DSBUILD_PAUSE_AT": f"photos/r00000.jsonl:3:{paused}"}
        proc = subprocess.Popen([sys.executable, "-m", "dsbuild", "sources", str(b.root)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not paused.exists():
            assert proc.poll() is None, proc.communicate()
            if time.time() > deadline:
                proc.kill()
                pytest.fail("the sources stage never reached its 3rd record")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = b.output_dir("sources") / "r00000.jsonl.partial"
        written = list(read_jsonl(partial))
        assert len(written) == 3 and not b.is_complete("sources")
        stamps = {r["id"]: (b.root / r["image"]).stat().st_mtime_ns for r in written}
        asked = len(srv.requests)
        res = run_sources(Build.open(b.root))
        assert res.records == 5 and not res.skipped
        recs = list(b.records("sources"))
        assert len({r["id"] for r in recs}) == 5
        for pid, ns in stamps.items():  # written photos were not prepared again
            assert (b.root / "photos" / "img" / f"{pid}.png").stat().st_mtime_ns == ns
        # the VLM was asked at most for the photos not yet written (the one in flight cached)
        assert len(srv.requests) - asked <= 5 - len(written)


# --- provenance in the export and its card ---------------------------------------------------


def test_provenance_reaches_the_export_and_the_card(tmp_path, mini_recipe):
    """Triples made from photos carry the photo's id and provenance (the contract of
    captions from photos); export writes license/source/attribution/photo_id per row and
    the card counts licences, says "unknown" plainly, and lists sources and attributions."""
    import datasets

    from dsbuild.cli.run import run_pipeline
    from dsbuild.core.exports import load_export
    from dsbuild.core.records import write_jsonl

    out = tmp_path / "b"
    run_pipeline(mini_recipe, out, offline=True, per_agent=2, until="filter",
                 echo=lambda s: None)
    b = Build.open(out)
    shard = out / "triples" / "r00000.jsonl"
    triples = list(read_jsonl(shard))
    assert len(triples) >= 3
    prov = [("p1", "cc-by-4.0", "library", "Ann Example"), ("p2", None, "phone", None)]
    for i, t in enumerate(triples[1:]):  # the first stays synthetic
        pid, lic, src, att = prov[i % 2]
        t.update(photo_id=pid, license=lic, photo_source=src, attribution=att)
    write_jsonl(shard, triples)
    from dsbuild.export.writer import run_export

    run_export(b)
    ds = load_export(out / "export", cache_dir=str(tmp_path / "hf"))
    for col in ("photo_id", "license", "source", "attribution", "reconstruction_psnr"):
        assert col in ds["train"].column_names
    rows = [r for k in ds for r in ds[k].cast_column("input_image", datasets.Image(decode=False))
            .cast_column("edited_image", datasets.Image(decode=False))]
    by_triple = {t["id"]: t for t in triples}
    for r in rows:
        t = by_triple[r["triple_id"]]
        assert (r["photo_id"], r["license"], r["source"], r["attribution"]) == (
            t.get("photo_id"), t.get("license"), t.get("photo_source"), t.get("attribution"))
    photo_rows = [r for r in rows if r["photo_id"]]
    assert photo_rows and any(r["photo_id"] is None for r in rows)
    card = (out / "export" / "README.md").read_text()
    assert "## Provenance" in card
    n_unknown = sum(r["photo_id"] == "p2" for r in rows)
    assert n_unknown and f"| unknown | 1 | {n_unknown} |" in card
    assert "**1 photo(s) (" in card and "have an unknown licence**" in card
    assert "`library`: 1" in card and "- Ann Example" in card
    assert f"| cc-by-4.0 | 1 | {sum(r['photo_id'] == 'p1' for r in rows)} |" in card
