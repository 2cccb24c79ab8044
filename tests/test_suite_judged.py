"""The judged suites, ``gedit-bench`` (VIEScore) and ``imgedit`` (1-5 rubric), on tiny local
copies made here (GEdit-Bench's Hub columns in a ``save_to_disk`` folder; ImgEdit's
singleturn.json layout and a datasets folder) against a scripted OpenAI-compatible judge that
answers scores the test knows: SC = min, PQ = min, O = sqrt(SC·PQ) per row, the category and
overall means, a malformed reply counted as missing (not 0), PQ shown the edit alone, the model
the server reported (drift) recorded, the language filter, and a re-run served from the
cached scores and judge replies."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
datasets = pytest.importorskip("datasets")

from openai_server import OpenAIServer, chat  # noqa: E402
from suite_copies import gedit_dataset  # noqa: E402

from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.evaluate.settings import EvalSettings, SuiteJudgeSettings  # noqa: E402
from dsbuild.evaluate.suites.imgedit import ImgEdit  # noqa: E402
from dsbuild.evaluate.suites.run import run_suites  # noqa: E402

# key, task_type, instruction, language, intersection, (success, overediting), size (w, h)
GEDIT = [
    ("g1", "background_change", "make the sky orange", "en", False, (7, 4), (32, 32)),
    ("g2", "background_change", "put a beach behind it", "en", True, (3, 9), (48, 32)),
    ("g3", "color_alter", "paint the car blue", "en", True, (8, 8), (32, 32)),
    ("g4", "color_alter", "turn the shirt green garble", "en", False, None, (32, 32)),
    ("g5", "subject-remove", "remove the dog drift", "en", False, (6, 2), (32, 40)),
    ("g6", "subject-remove", "erase the lamp", "en", True, (10, 5), (32, 32)),
    ("g7", "subject-add", "加一只猫", "cn", False, (5, 5), (32, 32)),
]
# key, edit_type, prompt, (compliance, naturalness, integrity)
IMGEDIT = [
    ("1001", "replace", "replace the apple with a pear", (4, 3, 5)),
    ("1002", "replace", "swap the cat for a fox", (2, 2, 1)),
    ("1003", "add", "add a kite in the sky", (5, 4, 4)),
    ("1004", "add", "add a bench garble", None),
    ("1005", "remove", "remove the car", (3, 5, 2)),
    ("1006", "remove", "remove the sign", (1, 4, 4)),
]
SC_SCORES = {g[2]: g[5] for g in GEDIT}
IM_SCORES = {r[2]: r[3] for r in IMGEDIT}
SETTINGS = EvalSettings(steps=2, suite_resolution=32, batch_size=4)


def image(seed: int, size: tuple[int, int]):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def gedit_folder(root: Path) -> Path:
    """GEdit-Bench's Hub columns (``input_image_raw`` too), saved with save_to_disk."""
    gedit_dataset(GEDIT, [image(i, g[6]) for i, g in enumerate(GEDIT)]).save_to_disk(str(root))
    return root


def imgedit_benchmark(root: Path) -> Path:
    """``Benchmark/singleturn/singleturn.json`` with its images at their ids."""
    folder = root / "Benchmark" / "singleturn"
    data = {}
    for i, (key, typ, prompt, _) in enumerate(IMGEDIT):
        rel = f"{typ}/{key}.jpg"
        (folder / typ).mkdir(parents=True, exist_ok=True)
        image(100 + i, (32, 32)).save(folder / rel, quality=95)
        data[key] = {"id": rel, "prompt": prompt, "edit_type": typ}
    (folder / "singleturn.json").write_text(json.dumps(data))
    return root


def user_parts(req: dict) -> tuple[str, list[str], str]:
    """(system prompt, image URLs, user text) of a chat request."""
    msgs = req["messages"]
    parts = msgs[1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    text = " ".join(p["text"] for p in parts if p["type"] == "text")
    return msgs[0]["content"], urls, text


class Judge:
    """The scripted judge: SC and ImgEdit scores from the instruction (the tables above), PQ
    scores from the edit's bytes (remembered), ``garble`` -> not JSON, ``drift`` -> another
    model name in the reply."""

    def __init__(self):
        self.pq: dict[str, tuple[int, int]] = {}
        self.sc_edit: dict[str, str] = {}

    def __call__(self, req: dict, n: int):
        system, urls, text = user_parts(req)
        if system.startswith("You check images."):
            h = hashlib.sha256(urls[0].encode()).digest()
            nat, art = h[0] % 11, h[1] % 11
            self.pq[urls[0]] = (nat, art)
            return chat(json.dumps({"naturalness": nat, "artifacts": art, "reason": "ok"}),
                        model="judge-x")
        instruction = re.match(r"Instruction: (.*)\nInput image:", text, re.S).group(1)
        model = "judge-y" if "drift" in instruction else "judge-x"
        if "garble" in instruction:
            return chat("the edit looks fine to me", model=model)
        if "success" in system:
            self.sc_edit[instruction] = urls[1]
            s, o = SC_SCORES[instruction]
            return chat(json.dumps({"success": s, "overediting": o, "reason": "ok"}), model=model)
        c, nat, i = IM_SCORES[instruction]
        return chat(json.dumps({"compliance": c, "naturalness": nat, "integrity": i,
                                "reason": "ok"}), model=model)


def mean(xs):
    return sum(xs) / len(xs)


def gedit_expected(judge: Judge, rows) -> dict[str, dict | None]:
    out = {}
    for key, _, instr, *_ in rows:
        if SC_SCORES[instr] is None:
            out[key] = None
            continue
        sc = min(SC_SCORES[instr])
        pq = min(judge.pq[judge.sc_edit[instr]])
        out[key] = {"sc": sc, "pq": pq, "o": math.sqrt(sc * pq)}
    return out


def check_gedit(got: dict, judge: Judge, rows) -> None:
    exp = gedit_expected(judge, rows)
    scored = [exp[g[0]] for g in rows if exp[g[0]] is not None]
    m = got["metrics"]
    assert (m["rows"], m["scored"], m["missing"]) == (len(rows), len(scored), 1)
    cats: dict[str, list[dict]] = {}
    for g in rows:
        cats.setdefault(g[1], [])
        if exp[g[0]] is not None:
            cats[g[1]].append(exp[g[0]])
    assert set(got["categories"]) == set(cats)
    for k in ("sc", "pq", "o"):
        assert m[k] == pytest.approx(mean([e[k] for e in scored]))
        assert m[f"{k}_macro"] == pytest.approx(mean([mean([e[k] for e in v])
                                                      for v in cats.values()]))
        for c, v in cats.items():
            assert got["categories"][c][k] == pytest.approx(mean([e[k] for e in v]))
        inter = [exp[g[0]] for g in rows if g[4] and exp[g[0]] is not None]
        assert got["intersection"][k] == pytest.approx(mean([e[k] for e in inter]))
    # the malformed reply: counted, excluded, never a 0
    assert got["categories"]["color_alter"]["rows"] == 2
    assert got["categories"]["color_alter"]["scored"] == 1
    assert got["judge"]["missing"] == {"sc not_json": 1}


@pytest.fixture
def sources(tmp_path):
    return {"gedit-bench": str(gedit_folder(tmp_path / "gedit")),
            "imgedit": str(imgedit_benchmark(tmp_path / "imgedit"))}


def test_judged_suites(tmp_path, sources, monkeypatch, one_torch_thread):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = Judge()
    out = tmp_path / "out"
    with OpenAIServer(handler=judge) as srv:
        js = SuiteJudgeSettings(model="judge-x", base_url=srv.base_url, max_retries=0)
        res = run_suites(["tiny"], ["gedit-bench", "imgedit"], out, SETTINGS, sources=sources,
                         judge=js)
        en = [g for g in GEDIT if g[3] == "en"]
        reqs = srv.chat_requests
        # 6 en rows x (SC + PQ), 6 ImgEdit rows; the cn row neither edited nor judged
        assert len(reqs) == 2 * len(en) + len(IMGEDIT)
        assert not any("加" in json.dumps(r["body"], ensure_ascii=False) for r in reqs)
        pq = [r for r in reqs if r["body"]["messages"][0]["content"].startswith("You check "
                                                                               "images.")]
        assert len(pq) == len(en)
        for r in pq:  # PQ: the edit alone, no instruction
            _, urls, text = user_parts(r["body"])
            assert len(urls) == 1 and "Instruction" not in text
            assert r["body"]["model"] == "judge-x"
        for r in reqs:
            if "compliance" in r["body"]["messages"][0]["content"]:
                _, urls, text = user_parts(r["body"])
                typ = next(t for _, t, p, _ in IMGEDIT if p in text)
                assert f"for a {typ} edit" in r["body"]["messages"][0]["content"]
                assert len(urls) == 2

        g = res["suites"]["gedit-bench"]["models"]["tiny"]
        check_gedit(g, judge, en)
        assert g["judge"]["model_requested"] == "judge-x"
        assert g["judge"]["models_reported"] == {"judge-x": 2 * len(en) - 1, "judge-y": 1}
        assert len(g["judge"]["rubric_hashes"]) == 2 and len(g["judge"]["prompt_hashes"]) == 2
        folder = Path(g["edits"])
        rows = json.loads((folder / "judge.json").read_text())
        assert [r["key"] for r in rows] == [x[0] for x in en]
        bad = next(r for r in rows if r["key"] == "g4")
        assert bad["o"] is None and bad["sc_record"]["missing"] == "not_json"
        assert bad["sc_record"]["raw"] == "the edit looks fine to me"
        drift = next(r for r in rows if r["key"] == "g5")["sc_record"]
        assert (drift["model_requested"], drift["model_reported"]) == ("judge-x", "judge-y")
        md = (out / "report.md").read_text()
        assert "judge-y" in md and "Warning" in md

        im = res["suites"]["imgedit"]["models"]["tiny"]
        scored = {r[0]: r[3] for r in IMGEDIT if r[3] is not None}
        m = im["metrics"]
        assert (m["rows"], m["scored"], m["missing"]) == (6, 5, 1)
        for j, k in enumerate(("compliance", "naturalness", "integrity")):
            assert m[k] == pytest.approx(mean([v[j] for v in scored.values()]))
        assert m["overall"] == pytest.approx(mean([mean(v) for v in scored.values()]))
        for typ in ("replace", "add", "remove"):
            vals = [r[3] for r in IMGEDIT if r[1] == typ and r[3] is not None]
            assert im["categories"][typ]["overall"] == pytest.approx(mean([mean(v)
                                                                           for v in vals]))
        assert im["categories"]["add"]["rows"] == 2 and im["categories"]["add"]["scored"] == 1
        assert im["judge"]["missing"] == {"not_json": 1}
        assert len(im["judge"]["rubric_hashes"]) == 3
        assert im["judge"]["models_reported"] == {"judge-x": 6}

        # the same run again: cached scores, not one new request
        n = len(srv.chat_requests)
        again = run_suites(["tiny"], ["gedit-bench", "imgedit"], out, SETTINGS,
                           sources=sources, judge=js)
        assert len(srv.chat_requests) == n
        assert again["suites"]["gedit-bench"]["models"]["tiny"]["metrics"] == g["metrics"]

        # every language: the cn row is edited and judged (2 requests), the rest from cache
        both = run_suites(["tiny"], ["gedit-bench"], out,
                          SETTINGS.model_copy(update={"gedit_language": "all"}),
                          sources={"gedit-bench": sources["gedit-bench"]}, judge=js)
        assert len(srv.chat_requests) == n + 2
        check_gedit(both["suites"]["gedit-bench"]["models"]["tiny"], judge, GEDIT)
        assert both["suites"]["gedit-bench"]["models"]["tiny"]["edits"] == g["edits"]


def test_imgedit_layouts_and_errors(tmp_path, sources):
    su = ImgEdit()
    bench = Path(sources["imgedit"])
    want = su.load(str(bench), None, None)
    assert [(r.key, r.category, r.instruction) for r in want] == [r[:3] for r in IMGEDIT]
    # the json's own folder, the json itself, and the limit
    single = bench / "Benchmark" / "singleturn"
    assert [r.key for r in su.load(str(single), None, 2)] == ["1001", "1002"]
    assert len(su.load(str(single / "singleturn.json"), None, None)) == 6
    # a datasets folder with key, prompt, edit_type, image
    ds = datasets.Dataset.from_dict({
        "key": [r.key for r in want], "prompt": [r.instruction for r in want],
        "edit_type": [r.category for r in want], "image": [r.input_image for r in want]},
        features=datasets.Features({"key": datasets.Value("string"),
                                    "prompt": datasets.Value("string"),
                                    "edit_type": datasets.Value("string"),
                                    "image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    got = su.load(str(tmp_path / "ds"), None, None)
    assert [(r.key, r.category, r.instruction) for r in got] == [r[:3] for r in IMGEDIT]
    assert all(np.array_equal(np.asarray(a.input_image), np.asarray(b.input_image))
               for a, b in zip(got, want, strict=True))
    with pytest.raises(DsbuildError, match="sysuyy/ImgEdit.*--suite-data imgedit=DIR"):
        su.load(None, None, None)
    (single / "add" / "1003.jpg").unlink()
    with pytest.raises(DsbuildError, match="1003.jpg not found"):
        su.load(str(bench), None, None)
    ds.remove_columns("edit_type").save_to_disk(str(tmp_path / "ds2"))
    with pytest.raises(DsbuildError, match="lacks column.*edit_type"):
        su.load(str(tmp_path / "ds2"), None, None)


def test_gedit_needs_judge_and_language_column(tmp_path, sources):
    with pytest.raises(DsbuildError, match="--judge-model"):
        run_suites(["tiny"], ["gedit-bench"], tmp_path / "o", SETTINGS,
                   sources={"gedit-bench": sources["gedit-bench"]})
    ds = datasets.load_from_disk(sources["gedit-bench"]).remove_columns("instruction_language")
    ds.save_to_disk(str(tmp_path / "bad"))
    from dsbuild.evaluate.suites.gedit import GEditBench

    with pytest.raises(DsbuildError, match="lacks column.*instruction_language"):
        GEditBench().load(str(tmp_path / "bad"), None, None)
    # the limit applies per language: 2 en rows and the cn one
    rows = GEditBench().load(sources["gedit-bench"], None, 2)
    assert [r.key for r in rows] == ["g1", "g2", "g7"]
