"""Caption triples grounded in real photos (issue 27 items 3 and 6): photos dealt to agents,
template edits of a photo's caption, the detector check on the photo (counted rejections with
reasons, deterministic, resumable), the openai prompt, and verify's preservation check."""

from __future__ import annotations

import json

import pytest
from builders import TRIPLES
from PIL import Image

from dsbuild.captions.grounding import (
    PhotoComposer,
    assign_photos,
    edit_targets,
    ground_check,
    named,
    things,
)
from dsbuild.captions.prompt import build_messages
from dsbuild.captions.settings import CaptionsSettings
from dsbuild.captions.stage import run_captions, triple_record
from dsbuild.core.hashing import content_id
from dsbuild.core.records import read_jsonl
from dsbuild.models.owl import OwlDetector
from dsbuild.verify import checks
from dsbuild.verify.settings import VerifySettings
from dsbuild.verify.stage import masked_similarity

CAPTIONS = ["a modern living room with a grey sofa and a rug",
            "a room with an oak coffee table, a floor lamp and a rug",
            "a red velvet armchair with a cushion"]
TINY = ["captions.backend=template", "captions.photos.detector=tiny", "captions.min_share=0",
        "captions.photos.per_photo=3"]


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def photo_records(build, captions=CAPTIONS) -> dict[str, dict]:
    """Photo records as the sources stage writes them, their prepared PNGs drawn with PIL."""
    out = {}
    (build.root / "photos" / "img").mkdir(parents=True, exist_ok=True)
    for i, cap in enumerate(captions):
        im = Image.new("RGB", (64, 64), (30 + 60 * i, 90, 200 - 50 * i))
        im.paste((200, 40, 40), (10, 20, 40, 50))
        pid = content_id("photo", i)
        rel = f"photos/img/{pid}.png"
        im.save(build.root / rel)
        out[pid] = {"id": pid, "path": f"/photos/{i}.jpg", "image": rel, "width": 64,
                    "height": 64, "caption": cap, "caption_source": "sidecar",
                    "license": "cc-by-4.0" if i else None, "source": "test-folder",
                    "attribution": f"photographer {i}"}
    return out


def triples(build) -> list[dict]:
    return list(read_jsonl(build.root / "triples" / "r00000.jsonl"))


def report(build) -> dict:
    return json.loads((build.reports_dir / "captions.json").read_text())


# ------------------------------------------------------------------------------ agents


def test_photos_go_to_the_agent_their_caption_names_else_round_robin(mini_build):
    agents = mini_build.recipe.ordered_agents()  # chairs (object), living-room (room)
    photos = [{"id": "b", "caption": "a red velvet armchair with a cushion"},
              {"id": "a", "caption": "a living room with a sofa"},
              {"id": "c", "caption": "a hallway with a mirror"},
              {"id": "d", "caption": "a bright space"}]
    got = assign_photos(agents, photos)
    assert [p["id"] for p in got["living-room"]] == ["a", "c", "d"]  # named, then the room agent
    assert [p["id"] for p in got["chairs"]] == ["b"]  # an object agent's subject
    assert assign_photos(agents, photos[::-1]) == got  # in id order, whatever the input order


# ------------------------------------------------------------------------------ template


def test_template_edits_only_what_the_photo_caption_names(mini_build):
    photos = photo_records(mini_build)
    run_captions(mini_build, overrides=[*TINY, "captions.photos.present_min=0",
                                        "captions.photos.absent_max=1",
                                        "captions.photos.per_photo=4"],
                 photos=photos, show_progress=False)
    out = triples(mini_build)
    assert len(out) == 4 * len(photos)  # per_photo each
    agents = {a.name: a for a in mini_build.recipe.ordered_agents()}
    for t in out:
        photo = photos[t["photo_id"]]
        assert t["input"] == photo["caption"]
        assert (t["license"], t["photo_source"], t["attribution"]) == (
            photo["license"], "test-folder", photo["attribution"])
        terms = things(agents[t["agent"]])
        here = {n for n, *_ in named(t["input"], terms)}
        tg = edit_targets(t["operation"], t["input"], t["output"], terms)
        if t["operation"] in ("remove", "replace"):
            assert tg["old"] and set(tg["old"]) <= here, t
        if t["operation"] == "change":
            assert tg["thing"] in here, t
        if t["operation"] in ("add", "replace"):
            assert tg["new"] and not set(tg["new"]) & here, t
    assert {t["operation"] for t in out} >= {"add", "remove", "replace", "change"}
    rep = report(mini_build)
    assert rep["photos"] == 3 and rep["grounded"] == {"grounded": 12}
    assert rep["kept"] == rep["target"] == 12


def test_photo_composer_keeps_the_caption_and_fixes_articles(mini_build):
    living = next(a for a in mini_build.recipe.ordered_agents() if a.name == "living-room")
    comp = PhotoComposer(living, 0, "a living room with a rug and a sofa", "p")
    seen = {}
    for cand, _ in zip(comp.candidates(), range(200), strict=False):
        seen.setdefault(cand["operation"], set()).add((cand["edit"], cand["output"]))
    assert ("remove the rug", "a living room with a sofa") in seen["remove"]
    assert ("remove the sofa", "a living room with a rug") in seen["remove"]
    three = PhotoComposer(living, 1, "a room with a sofa, a floor lamp and a rug", "r")
    outs = {(c["edit"], c["output"]) for c, _ in zip(three.candidates(), range(300), strict=False)
            if c["operation"] == "remove"}
    assert {o for e, o in outs if e.endswith("floor lamp")} == {"a room with a sofa and a rug"}
    assert any(o == "a living room with a rug and a sofa and a floor lamp"
               for _, o in seen["add"])
    # "a sofa" -> "an oak ..."-style article agreement after a replace or an inserted colour
    assert all(" a oak" not in o and " a a" not in o for ops in seen.values() for _, o in ops)
    # a caption naming none of the agent's things gives nothing to remove, replace or change
    bare = PhotoComposer(living, 0, "a bright empty space", "q")
    assert {c["operation"] for c, _ in zip(bare.candidates(), range(50), strict=False)} == {"add"}


# ------------------------------------------------------------------------------ grounding


def test_ground_check_rules_on_known_scores():
    rm = {"old": ["rug"], "new": [], "thing": None}
    add = {"old": [], "new": ["lamp"], "thing": None}
    ch = {"old": [], "new": [], "thing": "sofa"}
    assert ground_check("remove", rm, {"rug": 0.5}, 0.2, 0.1) is None
    assert ground_check("remove", rm, {"rug": 0.15}, 0.2, 0.1) == "ground_not_in_photo"
    assert ground_check("add", add, {"lamp": 0.05}, 0.2, 0.1) is None
    assert ground_check("add", add, {"lamp": 0.15}, 0.2, 0.1) == "ground_already_in_photo"
    assert ground_check("change", ch, {"sofa": 0.2}, 0.2, 0.1) is None
    assert ground_check("change", ch, {"sofa": 0.1}, 0.2, 0.1) == "ground_not_in_photo"
    rep = {"old": ["rug"], "new": ["sofa"], "thing": None}
    assert ground_check("replace", rep, {"rug": 0.9}, 0.2, 0.1) is None  # new not asked
    assert ground_check("add", {"old": [], "new": [], "thing": None}, {}, 0.2, 0.1) == \
        "ground_no_target"


def test_edit_targets_from_the_vocabulary():
    terms = ["coffee table", "floor lamp", "sofa", "rug"]
    assert edit_targets("remove", "a room with two sofas and a rug", "a room with a rug",
                        terms) == {"old": ["sofa"], "new": [], "thing": None}
    assert edit_targets("replace", "a room with a rug", "a room with a coffee table",
                        terms) == {"old": ["rug"], "new": ["coffee table"], "thing": None}
    assert edit_targets("change", "a room with a grey sofa and a rug",
                        "a room with a green sofa and a rug", terms)["thing"] == "sofa"


def low_scoring_owl():
    """The real tiny OWLv2 with its logit shift and scale pinned: every box scores about 0,
    so the check's outcome is known (the seeded tiny model's best boxes score near 1)."""
    import torch

    from dsbuild.models.owl import tiny_owlv2

    m, proc, tok = tiny_owlv2()
    with torch.no_grad():
        m.class_head.logit_shift.weight.zero_()
        m.class_head.logit_shift.bias.fill_(-50.0)
        m.class_head.logit_scale.weight.zero_()
        m.class_head.logit_scale.bias.fill_(1.0)  # scale elu(1) + 1 > 0: logits far below 0
    return OwlDetector(m, proc, tok)


def test_failed_grounding_is_a_counted_rejection_with_its_reason(mini_build):
    """A detector that sees nothing: every remove/replace/change fails as ground_not_in_photo,
    adds pass; no rejected triple is written and the counts add up in the report."""
    photos = photo_records(mini_build)
    run_captions(mini_build, overrides=TINY, photos=photos, show_progress=False,
                 detector=low_scoring_owl())
    out = triples(mini_build)
    assert out and {t["operation"] for t in out} == {"add"}
    rep = report(mini_build)
    g = rep["grounded"]
    assert g["grounded"] == len(out) and g["ground_not_in_photo"] > 0
    assert rep["rejected"]["ground_not_in_photo"] == g["ground_not_in_photo"]
    assert "ground_not_in_photo" in rep["reasons"]
    assert set(g) == {"grounded", "ground_not_in_photo"}


def test_an_add_the_detector_sees_is_rejected(mini_build):
    photos = photo_records(mini_build)
    run_captions(mini_build, overrides=[*TINY, "captions.photos.present_min=0",
                                        "captions.photos.absent_max=0"],
                 photos=photos, show_progress=False)
    assert "add" not in {t["operation"] for t in triples(mini_build)}
    rep = report(mini_build)
    assert rep["rejected"]["ground_already_in_photo"] == \
        rep["grounded"]["ground_already_in_photo"] > 0


class Killed(Exception):
    pass


class DyingOwl(OwlDetector):
    """The tiny OWLv2 (the same scores) that dies after ``calls`` image runs, as a kill would."""

    def __init__(self, calls: int):
        from dsbuild.models.owl import tiny_owlv2

        super().__init__(*tiny_owlv2())
        self.left = calls

    def run(self, pixels, phrases):
        if self.left == 0:
            raise Killed
        self.left -= 1
        return super().run(pixels, phrases)


def test_grounding_is_deterministic_and_a_resumed_rank_redoes_nothing(tmp_path, mini_recipe):
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe

    over = [*TINY, "captions.photos.present_min=0", "captions.photos.absent_max=0"]

    def build(name):
        b = Build.init(tmp_path / name, load_recipe(mini_recipe), recipe_path=str(mini_recipe))
        return b, photo_records(b)

    a, photos = build("a")
    run_captions(a, overrides=over, photos=photos, show_progress=False)
    full, rep_a = triples(a), report(a)
    assert full and rep_a["rejected"]["ground_already_in_photo"]  # tiny sees every add
    b, photos_b = build("b")
    assert photos_b == photos
    with pytest.raises(Killed):  # the grounding detector dies mid-run: a partial shard stays
        run_captions(b, overrides=over, photos=photos, show_progress=False,
                     detector=DyingOwl(calls=4))
    written = len(list(read_jsonl(b.root / "triples" / "r00000.jsonl.partial")))
    assert 0 < written < len(full)
    run_captions(b, overrides=over, photos=photos, show_progress=False)
    assert triples(b) == full
    assert b.markers("captions")[0]["stats"]["resumed"] == written
    rep_b = report(b)
    for key in ("rejected", "grounded", "kept", "target", "photos"):
        assert rep_b[key] == rep_a[key], key


def test_a_build_without_photos_signs_as_before(mini_build):
    """The photo settings at their defaults add nothing to the captions signature; changed,
    they do."""
    s = CaptionsSettings()
    assert "photos" not in s.signature_dict()
    assert CaptionsSettings(photos={"per_photo": 2}).signature_dict()["photos"]["per_photo"] == 2
    assert "preserve_min" not in VerifySettings().signature_dict()
    assert VerifySettings(preserve_min=0.9).signature_dict()["preserve_min"] == 0.9
    run_captions(mini_build, overrides=["captions.backend=template", "captions.per_agent=2"],
                 show_progress=False)
    assert all("photo_id" not in t for t in triples(mini_build))
    assert "photos" not in report(mini_build)


def test_triple_record_carries_the_photo(mini_build):
    agent = mini_build.recipe.ordered_agents()[0]
    t = {"operation": "remove", "input": "a red armchair with a cushion",
         "edit": "remove the cushion", "output": "a red armchair"}
    plain = triple_record(mini_build.recipe, agent, t, "template", None)
    photo = {"id": "p1", "license": None, "source": "folder", "attribution": "me"}
    rec = triple_record(mini_build.recipe, agent, t, "template", None, photo)
    assert rec == {**plain, "photo_id": "p1", "license": None, "photo_source": "folder",
                   "attribution": "me"}


def test_the_openai_prompt_gives_the_photo_caption_as_the_input(mini_build):
    agent = mini_build.recipe.ordered_agents()[1]
    msgs = build_messages(mini_build.recipe, agent, 3, 0, 0,
                          photo_caption="a living room with a sofa")
    user = msgs[1]["content"]
    assert 'Input caption (of a real photo): "a living room with a sofa"' in user
    assert "word for word" in user
    assert build_messages(mini_build.recipe, agent, 3, 0, 0)[1]["content"] in user


def test_openai_photo_triples_must_keep_the_photo_caption(mini_build):
    """A line that rewrites the photo's caption is rejected (photo_input_changed); one that
    keeps it is grounded like a template triple."""
    from dsbuild.captions.stage import CaptionsRun
    from dsbuild.core.records import ShardWriter

    photos = photo_records(mini_build, CAPTIONS[:1])
    mini_build.update([*TINY, "captions.photos.present_min=0", "captions.photos.absent_max=1"])
    living = mini_build.recipe.ordered_agents()[1]
    assigned = {"living-room": list(photos.values()), "chairs": []}
    writer = ShardWriter(mini_build.output_dir("captions") / "r00000.jsonl", "id", fresh=True)
    run = CaptionsRun(mini_build, [living], "openai", writer, show_progress=False,
                      photos=assigned)
    photo = next(iter(photos.values()))
    run.offer(living, {"input": "a living room with a sofa and a rug", "edit": "remove the rug",
                       "output": "a living room with a sofa"}, photo=photo)
    run.offer(living, {"input": CAPTIONS[0], "edit": "remove the rug",
                       "output": "a modern living room with a grey sofa"}, photo=photo)
    writer.close()
    st = run.stats(0.0)
    assert st["rejected"] == {"photo_input_changed": 1}
    assert st["kept"] == 1 and st["grounded"] == {"grounded": 1}
    assert writer.records[0]["photo_id"] == photo["id"]


# ------------------------------------------------------------------------------ verify


def test_preservation_outside_the_mask():
    a = Image.new("RGB", (32, 32), (100, 100, 100))
    b = a.copy()
    b.paste((250, 0, 0), (0, 0, 16, 32))  # the left half changed
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # ... and the mask lets it change
    assert masked_similarity(a, b, mask) == pytest.approx(1.0)
    assert masked_similarity(a, b, Image.new("L", (32, 32), 0)) < 0.8
    assert masked_similarity(a, b, Image.new("L", (32, 32), 255)) is None
    s = VerifySettings()
    assert checks.preserve_check(0.99, s)["pass"] is True
    fail = checks.preserve_check(0.9, s)
    assert fail["pass"] is False and fail["reason"] == "photo_not_preserved"
    assert checks.preserve_check(None, s)["pass"] is None


def test_verify_rejects_photo_pairs_that_change_outside_their_mask(mini_build):
    from builders import triple_record as make_triple
    from test_verify import SceneDetector

    from dsbuild.verify.stage import run_verify

    recipe = mini_build.recipe.name
    tr = [make_triple(recipe, *t) for t in TRIPLES[:1]]
    mini_build.run_stage("captions", 0, 1, lambda w: [w.write(t) for t in tr] and None,
                         report=False)
    photo = Image.new("RGB", (64, 64), (90, 120, 150))
    edited = photo.copy()
    edited.paste((240, 20, 20), (0, 0, 32, 64))
    spoilt = edited.copy()
    spoilt.paste((10, 250, 10), (32, 0, 64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    pairs = []
    for k, out in enumerate((edited, spoilt, spoilt)):
        pid = content_id("pair", k)
        rel = f"pairs/img/{tr[0]['id']}/{pid}"
        (mini_build.root / rel).parent.mkdir(parents=True, exist_ok=True)
        photo.save(mini_build.root / f"{rel}_0.png")
        out.save(mini_build.root / f"{rel}_1.png")
        images = {"input": f"{rel}_0.png", "output": f"{rel}_1.png"}
        if k < 2:  # the third has no mask: no preservation check
            mask.save(mini_build.root / f"{rel}_mask.png")
            images["mask"] = f"{rel}_mask.png"
        pairs.append({"id": pid, "triple_id": tr[0]["id"], "seed": k, "params": {},
                      "model": "tiny", "images": images, "photo_id": "p1"})
    mini_build.run_stage("generate", 0, 1, lambda w: [w.write(p) for p in pairs] and None,
                         report=False)
    from builders import write_scores

    write_scores(mini_build, pairs, [0.3, 0.3, 0.3])
    run_verify(mini_build, detector=SceneDetector(), quiet=True)
    recs = {r["pair_id"]: r for r in mini_build.records("verify")}
    pres = [next((c for c in recs[p["id"]]["checks"] if c["name"] == "preserve"), None)
            for p in pairs]
    assert pres[0]["pass"] is True and pres[0]["similarity"] == pytest.approx(1.0)
    assert pres[1]["pass"] is False and recs[pairs[1]["id"]]["reason"] == "photo_not_preserved"
    assert pres[2] is None
    rep = json.loads((mini_build.reports_dir / "verify.json").read_text())
    assert rep["checks"]["preserve"]["label"] == "photo-preserved"
    assert rep["checks"]["preserve"]["fail"] == 1
    assert "0.95" in rep["checks"]["preserve"]["asks"]

