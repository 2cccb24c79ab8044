"""Captions stage offline: the validator's rules, the template backend, recipe checks, CLI."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from dsbuild.captions.prompt import NOT_JSON, build_messages, parse_lines
from dsbuild.captions.stage import run_captions
from dsbuild.captions.validate import Validator, check_examples
from dsbuild.cli import cli
from dsbuild.core.build import Build
from dsbuild.core.config import default_recipe_path, load_recipe
from dsbuild.core.errors import ConfigError, DsbuildError
from dsbuild.core.records import read_jsonl


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


GOOD = [
    ("chairs", {"input": "a green oak armchair with a cushion", "edit": "make the armchair red",
                "output": "a red oak armchair with a cushion"}, "change"),
    ("chairs", {"input": "an oak dining chair without armrests", "edit": "add armrests",
                "output": "an oak dining chair with armrests"}, "add"),
    ("chairs", {"input": "a rustic oak armchair with a cushion", "edit": "remove the cushion",
                "output": "a rustic oak armchair"}, "remove"),
    ("living-room", {"input": "a modern living room with a couch, a rug and a floor lamp",
                     "edit": "remove the sofa",
                     "output": "a modern living room with a rug and a floor lamp"}, "remove"),
    ("living-room", {"input": "a living room with a grey sofa and a rug",
                     "edit": "replace the rug with a coffee table",
                     "output": "a living room with a grey sofa and a coffee table"}, "replace"),
    ("living-room", {"input": "a living room with a sofa and no coffee table",
                     "edit": "add an oak coffee table", "operation": "add",
                     "output": "a living room with a sofa and an oak coffee table"}, "add"),
    # instruction verbs LLMs use that are not in the few-shot examples
    ("living-room", {"input": "a living room with beige walls and a grey sofa",
                     "edit": "Repaint the walls sage green",
                     "output": "a living room with sage green walls and a grey sofa"}, "change"),
    ("living-room", {"input": "a living room with a leather sofa and no rug",
                     "edit": "Lay a jute rug on the floor",
                     "output": "a living room with a leather sofa and a jute rug"}, "add"),
    ("chairs", {"input": "a plain oak armchair with a cushion",
                "edit": "Re-upholster the armchair in yellow velvet",
                "output": "a plain yellow velvet armchair with a cushion"}, "change"),
    ("chairs", {"input": "a plain oak armchair", "edit": "upgrade the armchair to walnut",
                "output": "a plain walnut armchair"}, "change"),
]

BAD = [
    ("chairs", "not a dict", "not_object"),
    ("chairs", {"input": "a red chair", "edit": "make it blue"}, "missing_field"),
    ("chairs", {"input": "a red chair", "edit": "", "output": "a blue chair"}, "missing_field"),
    ("chairs", {"input": "a red chair", "edit": "make it red", "output": "A red chair."},
     "no_change"),
    ("chairs", {"input": "a red chair", "edit": "the chair is now blue",
                "output": "a blue chair"}, "edit_not_instruction"),
    ("chairs", {"input": "a red chair", "edit": "a blue chair", "output": "a blue chair"},
     "edit_is_caption"),
    ("chairs", {"input": "a red velvet armchair by a window in a bright room",
                "edit": "make the armchair blue",
                "output": "a red velvet armchair by a door in a bright room"},
     "diff_unrelated_to_edit"),
    ("chairs", {"input": "a red velvet armchair", "edit": "make the armchair a blue oak stool",
                "output": "a blue oak stool"}, "diff_too_large"),
    ("chairs", {"input": "a red velvet armchair with a cushion next to an oak table",
                "edit": "make the armchair blue and the table pine and the cushion green",
                "output": "a blue velvet armchair with a green cushion next to a pine table"},
     "diff_too_scattered"),
    ("chairs", {"input": "a red velvet armchair", "edit": "remove the cushion",
                "output": "a red velvet armchair without a cushion"}, "remove_not_in_input"),
    ("chairs", {"input": "a red velvet armchair with a cushion and a throw",
                "edit": "remove the cushion",
                "output": "a red velvet armchair with a cushion and no throw"},
     "remove_still_in_output"),
    ("chairs", {"input": "a red velvet armchair", "edit": "add a cushion",
                "output": "a red velvet armchair with a cushion"}, "add_not_absent_in_input"),
    ("chairs", {"input": "a red velvet armchair without a cushion", "edit": "add a cushion",
                "output": "a red velvet armchair with no cushion at all"}, "add_not_in_output"),
    ("chairs", {"input": "a red velvet armchair without a cushion", "edit": "add a cushion",
                "operation": "remove", "output": "a red velvet armchair with a cushion"},
     "operation_mismatch"),
    ("chairs", {"input": "a red velvet armchair", "edit": "make the armchair blue",
                "output": "a blue velvet armchair"}, "copies_example"),
    ("chairs", {"input": " ".join(["a very"] * 40) + " red chair", "edit": "make it blue",
                "output": " ".join(["a very"] * 40) + " blue chair"}, "too_long"),
]


@pytest.mark.parametrize("agent_name,cand,op", GOOD)
def test_validator_keeps_good_triples(mini_recipe, agent_name, cand, op):
    r = load_recipe(mini_recipe)
    res = Validator().check(cand, r.agent(agent_name))
    assert res.ok, res.reason
    assert res.triple["operation"] == op


@pytest.mark.parametrize("agent_name,cand,reason", BAD)
def test_validator_rejects_each_rule(mini_recipe, agent_name, cand, reason):
    r = load_recipe(mini_recipe)
    v = Validator()
    v.remember_examples(r.agent(agent_name))
    res = v.check(cand, r.agent(agent_name))
    assert res.reason == reason
    assert v.rejected == {reason: 1}


def test_validator_duplicates_and_operations(mini_recipe):
    chairs = load_recipe(mini_recipe).agent("chairs")
    v = Validator()
    t = {"input": "a green oak armchair", "edit": "make the armchair red",
         "output": "a red oak armchair"}
    assert v.check(t, chairs).ok
    assert v.check(dict(t, input="A green  oak armchair."), chairs).reason == "duplicate"
    assert v.check(dict(t, edit="paint the armchair red"), chairs).reason == "near_duplicate"
    only_add = chairs.model_copy(update={"operations": ["add"]})
    t2 = {"input": "a blue oak armchair", "edit": "make the armchair red",
          "output": "a red oak armchair"}
    assert Validator().check(t2, only_add).reason == "operation_not_allowed"


def test_parse_lines_handles_junk_markers_fences_and_arrays():
    text = ('Sure! Here they are:\n```json\n1. {"input": "a", "edit": "b", "output": "c"}\n'
            '- {"input": "d", "edit": "e", "output": "f"},\n42\n```\n')
    got = parse_lines(text)
    assert got[0] is NOT_JSON and got[1]["input"] == "a" and got[2]["input"] == "d"
    assert got[3] == 42
    assert parse_lines('[{"input": "a"}, {"input": "b"}]') == [{"input": "a"}, {"input": "b"}]


def test_prompt_states_rules_examples_and_batch(mini_recipe):
    r = load_recipe(mini_recipe)
    msgs = build_messages(r, r.agent("living-room"), 7, 2, seed=0)
    system, user = msgs[0]["content"], msgs[1]["content"]
    assert "JSON" in system and "Removal: the input caption must name" in system
    assert "Addition: the input caption must say that the thing is absent" in system
    assert '"edit": "add a rug"' in user and "Batch 3. Write 7 new samples" in user
    assert msgs == build_messages(r, r.agent("living-room"), 7, 2, seed=0)


def test_builtin_recipe_examples_pass_and_hierarchy():
    r = load_recipe(default_recipe_path())
    check_examples(r)
    names = [a.name for a in r.ordered_agents()]
    for n in ("chairs", "tables", "sofas", "beds", "lamps", "curtains-blinds",
              "cabinets-shelves", "rugs", "living-room", "bedroom", "kitchen", "bathroom",
              "dining-room", "home-office", "hallway-entryway", "kids-room"):
        assert n in names
    levels = [a.level for a in r.ordered_agents()]
    assert levels == sorted(levels, key=["object", "room"].index)
    assert sum(a.count for a in r.agents) >= 2000


def test_recipe_with_bad_example_is_a_clear_error(tmp_path, mini_recipe):
    text = mini_recipe.read_text().replace(
        "{input: a red velvet armchair, edit: make the armchair blue, output: a blue velvet "
        "armchair}",
        "{input: a red velvet armchair, edit: add armrests, output: a red velvet armchair "
        "with armrests}")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    # refused at init, before anything is written
    with pytest.raises(ConfigError) as ei:
        Build.init(tmp_path / "b", load_recipe(bad), recipe_path=str(bad))
    msg = str(ei.value)
    assert str(bad) in msg and "agents[0] (chairs).examples[0]" in msg
    assert "add_not_absent_in_input" in msg
    assert not (tmp_path / "b").exists()
    res = CliRunner().invoke(cli, ["init", str(tmp_path / "b"), "--recipe", str(bad)])
    assert res.exit_code != 0 and "examples[0]" in str(res.exception)
    assert not (tmp_path / "b").exists()


def _template_build(root, seed=0, recipe=None):
    recipe = recipe or default_recipe_path()
    return Build.init(root, load_recipe(recipe), recipe_path=str(recipe),
                      overrides=[f"captions.seed={seed}"])


def test_template_backend_2000_valid_unique_deterministic(tmp_path):
    b1 = _template_build(tmp_path / "a")
    res = run_captions(b1, show_progress=False)
    assert res.records >= 2000
    recs = list(b1.records("captions"))
    assert len({r["id"] for r in recs}) == len(recs) >= 2000
    recipe = b1.recipe
    assert {r["agent"] for r in recs} == {a.name for a in recipe.agents}
    per_agent = {a.name: sum(r["agent"] == a.name for r in recs) for a in recipe.agents}
    assert all(per_agent[a.name] == a.count for a in recipe.agents)
    v = Validator()
    for r in recs:
        assert r["source"] == {"backend": "template", "model": None} and not r["no_change"]
        res = v.check(r, recipe.agent(r["agent"]))
        assert res.ok, (res.reason, r)
        assert r["operation"] == res.triple["operation"]
    assert {r["operation"] for r in recs} == {"add", "remove", "change", "replace"}
    # indefinite articles agree ("an art deco look", never "a industrial style")
    article = re.compile(r"\b(?:a [aeiou]|an [b-df-hj-np-tv-z])")
    assert not [t for r in recs for t in (r["input"], r["edit"], r["output"])
                if article.search(t)]
    # ... and uncountable things take none ("with wall art", never "a wall art")
    mass = re.compile(r"\ban? (?:wall art|wainscoting)\b")
    assert not [t for r in recs for t in (r["input"], r["output"]) if mass.search(t)]
    # order: objects first, then rooms (the hierarchy)
    levels = [r["level"] for r in recs]
    assert levels == sorted(levels, key=["object", "room"].index)
    # same seed byte-identical, another seed different: test_template_seed_shards_limit_and_scale
    report = json.loads((tmp_path / "a" / "reports" / "captions.json").read_text())
    assert report["kept"] == len(recs) and report["backend"] == "template"
    assert (tmp_path / "a" / "reports" / "captions.png").stat().st_size > 1000


def test_template_seed_shards_limit_and_scale(tmp_path, mini_recipe):
    one = _template_build(tmp_path / "one", recipe=mini_recipe)
    run_captions(one, show_progress=False)
    ids = sorted(r["id"] for r in one.records("captions"))
    # same seed, another build: byte-identical
    again = _template_build(tmp_path / "again", recipe=mini_recipe)
    run_captions(again, show_progress=False)
    shard = "triples/r00000.jsonl"
    assert (again.root / shard).read_bytes() == (one.root / shard).read_bytes()
    three = _template_build(tmp_path / "three", recipe=mini_recipe)
    counts = [run_captions(three, rank, 3, show_progress=False).records for rank in (0, 1, 2)]
    assert counts == [12, 12, 0]  # the unit is the agent; a rank without one writes nothing
    assert sorted(r["id"] for r in three.records("captions")) == ids
    report = json.loads((three.reports_dir / "captions.json").read_text())
    assert report["complete"] and report["kept"] == 24 and report["done_ranks"] == [0, 1, 2]
    other = _template_build(tmp_path / "other", seed=1, recipe=mini_recipe)
    run_captions(other, show_progress=False)
    assert sorted(r["id"] for r in other.records("captions")) != ids
    run_captions(other, show_progress=False, overrides=["captions.per_agent=3"])
    assert len(list(other.records("captions"))) == 6
    run_captions(other, show_progress=False, overrides=["captions.per_agent=null",
                                                        "captions.count_scale=0.5"])
    assert len(list(other.records("captions"))) == 12


def test_auto_backend_choice(monkeypatch):
    from dsbuild.captions.settings import CaptionsSettings
    from dsbuild.captions.stage import resolve_backend

    assert resolve_backend(CaptionsSettings()) == "template"
    assert resolve_backend(CaptionsSettings(base_url="http://127.0.0.1:9/v1")) == "openai"
    monkeypatch.setenv("MY_KEY", "k")
    assert resolve_backend(CaptionsSettings(api_key_env="MY_KEY")) == "openai"
    assert resolve_backend(CaptionsSettings(api_key_env="MY_KEY", backend="template")) == \
        "template"


def test_cli_captions_prints_summary_and_resumes(tmp_path, mini_recipe):
    root = tmp_path / "b"
    run = CliRunner().invoke
    assert run(cli, ["init", str(root), "--recipe", str(mini_recipe)]).exit_code == 0
    res = run(cli, ["captions", str(root), "--backend", "template", "--set", "captions.per_agent=4"])
    assert res.exit_code == 0, res.output
    assert "captions rank 0/1: done, 8 records" in res.output
    assert "kept 8 of 8 target triples (template)" in res.output
    assert "chairs" in res.output and "living-room" in res.output
    assert Build.open(root).config.captions.backend == "template"
    res = run(cli, ["captions", str(root)])
    assert "already done (skipped)" in res.output
    lines = list(read_jsonl(root / "triples" / "r00000.jsonl"))
    assert len(lines) == 8


def test_template_backend_with_too_thin_a_vocabulary_is_a_clear_error(tmp_path, mini_recipe):
    """An agent the template cannot compose for fails with a message, instead of looping."""
    text = mini_recipe.read_text().replace(
        "      objects: [sofa, rug, coffee table, floor lamp]", "      objects: [sofa, rug]")
    thin = tmp_path / "thin.yaml"
    thin.write_text(text)
    b = Build.init(tmp_path / "b", load_recipe(thin), recipe_path=str(thin))
    with pytest.raises(DsbuildError, match="agent 'living-room'.*3\\+ objects"):
        run_captions(b, show_progress=False)
