"""Preference pairs (dsbuild.export.preference_pairs): grouping and ordering by evidence."""

from __future__ import annotations

from builders import make_judged_build
from PIL import Image

from dsbuild.core import join
from dsbuild.export import preference_pairs as preferences


def share_inputs(b, pairs):
    """Every pair of a triple edits one source image (as photo edits do): the builder draws
    a source per seed, so copy the first one's bytes over the others'."""
    first: dict[str, bytes] = {}
    for p in pairs:
        path = b.root / p["images"]["input"]
        data = first.setdefault(p["triple_id"], path.read_bytes())
        path.write_bytes(data)


def test_pairs_share_input_and_instruction_and_curators_win(mini_build):
    b = mini_build
    out = make_judged_build(b, judge={0: {"instruction": 2, "preserve": 9, "quality": 9},
                                      1: {"instruction": 9, "preserve": 9, "quality": 9}},
                            reject={2}, decisions={1: ("reject", "fiftyone")})
    share_inputs(b, out["pairs"])
    rows, _ = join.rows(b, policy="scored")
    got = preferences.pairs(rows, b.root)
    assert got, "the judged build yields preference pairs"
    assert all(p["reason"] in preferences.REASONS and p["margin"] > 0 for p in got)
    for p in got:
        c, r = p["chosen"], p["rejected"]
        assert c["triple_id"] == r["triple_id"] and c["edit_prompt"] == r["edit_prompt"]
        with Image.open(b.root / c["_images"]["input"]) as a, \
                Image.open(b.root / r["_images"]["input"]) as z:
            assert a.tobytes() == z.tobytes()
        assert c["pair_id"] != r["pair_id"]
    k = out["kept"]
    # the curator's reject of the judge's best pair wins over its score: never chosen
    assert all(p["chosen"]["pair_id"] != k[1] for p in got)
    grp = next(g for g in preferences.groups(rows, b.root).values()
               if any(r["pair_id"] == k[1] for r in g))
    assert len(grp) > 1 and grp[-1]["pair_id"] == k[1]  # the judge's best, ranked last
    assert any(p["rejected"]["pair_id"] == k[1] and p["reason"] == "review" for p in got)

def test_separate_orders_signals():
    base = {"review": None, "verify": None, "judge_score": None, "filter_keep": True,
            "clip_sim_dir": 0.2}
    assert preferences.separate({**base, "review": "accept"},
                                {**base, "judge_score": 0.9}) == ("review", 1.0)
    assert preferences.separate({**base, "verify": "pass"},
                                {**base, "verify": "reject"}) == ("verify", 1.0)
    assert preferences.separate({**base, "judge_score": 0.3},
                                {**base, "judge_score": 0.9}) is None
    sep = preferences.separate({**base, "judge_score": 0.9}, {**base, "judge_score": 0.5})
    assert sep[0] == "judge" and abs(sep[1] - 0.4) < 1e-9
    assert preferences.separate(base, {**base, "filter_keep": False, "clip_sim_dir": 0.1}
                                )[0] == "filter"
    assert preferences.separate(base, base) is None


def test_split_follows_the_main_export(mini_build):
    from dsbuild.export.dataset import collect_rows

    b = mini_build
    out = make_judged_build(b, samples=3, reject={0, 3})
    share_inputs(b, out["pairs"])
    rows, _ = join.rows(b, policy="scored")
    main = collect_rows(b).splits
    got = preferences.assign_splits(preferences.pairs(rows, b.root), main,
                                    b.config.split.test_ratio, b.config.split.seed)
    assert sum(map(len, got.values())) == len(preferences.pairs(rows, b.root)) > 0
    main_side = {r["triple_id"]: s for s, rs in main.items() for r in rs}
    caps: dict[str, set[str]] = {}
    for s, ps in got.items():
        for p in ps:
            t = p["chosen"]["triple_id"]
            assert main_side.get(t, s) == s
            caps.setdefault(p["chosen"]["original_prompt"], set()).add(s)
    assert all(len(v) == 1 for v in caps.values())


def test_written_dataset_loads(mini_build, tmp_path):
    import datasets

    from dsbuild.export.dataset import collect_rows

    b = mini_build
    out = make_judged_build(b, judge={0: {"instruction": 2, "preserve": 9, "quality": 9}},
                            reject={3})
    share_inputs(b, out["pairs"])
    rows, _ = join.rows(b, policy="scored")
    prefs = preferences.pairs(rows, b.root)
    splits = preferences.assign_splits(prefs, collect_rows(b).splits,
                                       b.config.split.test_ratio, b.config.split.seed)
    counts = preferences.write(b.root, splits, tmp_path / "prefs")
    assert sum(counts["splits"].values()) == len(prefs) == sum(counts["reasons"].values())
    dd = datasets.load_from_disk(str(tmp_path / "prefs"))
    got = [x for s in dd for x in dd[s]]
    assert len(got) == len(prefs)
    x = got[0]
    assert x["chosen_image"].size == x["rejected_image"].size == x["input_image"].size
    assert x["reason"] in preferences.REASONS and x["chosen_pair_id"] != x["rejected_pair_id"]


def test_cli_writes_the_preference_dataset(mini_build, tmp_path):
    import datasets
    from click.testing import CliRunner

    from dsbuild.cli import cli

    b = mini_build
    out = make_judged_build(b, judge={0: {"instruction": 2, "preserve": 9, "quality": 9}})
    share_inputs(b, out["pairs"])
    r = CliRunner().invoke(cli, ["export", str(b.root), "--preferences", "--export-dir",
                                 str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "preference pairs" in r.output and "by reason" in r.output
    dd = datasets.load_from_disk(str(tmp_path / "p"))
    assert sum(len(dd[s]) for s in dd) > 0


def test_card_and_settings(mini_build, tmp_path):
    from dsbuild.core.config import apply_overrides

    b = mini_build
    sig = b.config.export.signature_dict()
    assert "preferences" not in sig  # the main export signs as before
    out = make_judged_build(b, judge={0: {"instruction": 2, "preserve": 9, "quality": 9}},
                            reject={3})
    share_inputs(b, out["pairs"])
    b.config = apply_overrides(b.config, ["export.preferences.max_per_group=1"])
    assert b.config.export.signature_dict() == sig
    res = preferences.export_preferences(b, tmp_path / "p")
    rows, _ = join.rows(b, policy="scored")
    n = sum(1 for g in preferences.groups(rows, b.root).values()
            if any(preferences.separate(g[0], w) for w in g[1:]))
    assert sum(res["splits"].values()) == n > 0  # max_per_group=1: one pair per group
    text = (tmp_path / "p" / "README.md").read_text()
    assert "# Preference pairs of" in text and "| reason | pairs |" in text
    for k, v in res["reasons"].items():
        assert f"| {k} | {v} |" in text


def test_session_build(mini_build, tmp_path):
    import datasets
    from builders import make_session_build

    b = mini_build
    out = make_session_build(b, runs=2, fail={(0, 0, 1)})
    share_inputs(b, out["pairs"])  # the two runs of a node edit one image
    res = preferences.export_preferences(b, tmp_path / "s")
    assert res["reasons"].get("filter", 0) >= 1  # the failed turn is the rejected one
    dd = datasets.load_from_disk(str(tmp_path / "s"))
    assert {s: len(dd[s]) for s in dd} == res["splits"]
    for s in dd:
        for x in dd[s]:
            assert x["chosen_image"].size == x["rejected_image"].size
            if x["session_id"]:
                assert x["turn"] >= 1 and x["chosen_session_run"] != x["rejected_session_run"]
