"""No-change augmentation: never names what the caption mentions; seeded; per split."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from builders import make_build

from dsbuild.augment.mentions import Mentions, absent_terms, forms, phrase_in, words
from dsbuild.augment.stage import no_change_instruction, run_augment
from dsbuild.core.split import caption_key, row_nodes, split_rows


def _surface(term: str, mentions: Mentions) -> set[str]:
    """Independent oracle: every spelling of a term a caption could use (test's own rules)."""
    out = set()
    for name in mentions.names_of(term):
        base = name.lower()
        out |= {base, base + "s", base + "es"}
        if base.endswith("s"):
            out.add(base[:-1])
        if " " in base:  # the head noun alone ("table" for "coffee table")
            head = base.split()[-1]
            out |= {head, head + "s"}
    return out


def _says(caption: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(phrase)}(?![a-z])", caption.lower()) is not None


def test_forms_and_phrases():
    assert "shelf" in forms("shelves") and "shelves" in forms("shelf")
    assert "lamp" in forms("lamps") and "armrest" in forms("armrests")
    assert phrase_in("coffee table", words("two Coffee-Tables by the window"))
    assert phrase_in("coffee table", words("a dining table"))  # head noun counts
    assert not phrase_in("rug", words("a rugged oak floor"))


def test_augment_never_names_a_mentioned_thing(mini_build):
    """Property test over the vocabulary: every subset of things, named by singular, plural
    or synonym, and many seeds; the named thing is never one the caption mentions."""
    recipe = mini_build.recipe
    mentions = Mentions(recipe)
    checked = 0
    for agent in recipe.agents:
        v = agent.vocabulary
        things = [*v.objects, *v.features]
        spellings = {t: sorted({t, t + "s", *mentions.names_of(t)}) for t in things}
        for k in range(len(things) + 1):
            for subset in itertools.combinations(things, k):
                for pick in range(3):
                    named = [spellings[t][(pick + i) % len(spellings[t])]
                             for i, t in enumerate(subset)]
                    caption = f"a {v.styles[0]} {v.subjects[0]}" + (
                        " with " + " and ".join(named) if named else "")
                    terms = absent_terms(recipe, agent, caption, mentions)
                    assert set(terms).isdisjoint(subset), caption
                    for seed in range(4):
                        if not terms:
                            break
                        rng = random.Random(seed)
                        term = rng.choice(terms)
                        op, edit = no_change_instruction(agent, term, rng)
                        assert op in ("remove", "change") and term in edit
                        assert not any(_says(caption, s) for s in _surface(term, mentions)), (
                            caption, edit)
                        checked += 1
    assert checked > 100


def test_shipped_recipe_instructions_never_name_a_present_thing():
    """Property test over the interior-design recipe's whole vocabulary: a caption showing any
    one thing (subject, object, fixture or feature; singular, plural or synonym) never gets an
    instruction that names, as a whole phrase, anything the caption shows ("remove the curtain
    rod" on a picture of curtains), and articles from the vocabulary ("a lower shelf") never
    end up after "the"."""
    from dsbuild.augment.mentions import candidates
    from dsbuild.core.config import default_recipe_path, load_recipe

    recipe = load_recipe(default_recipe_path())
    mentions = Mentions(recipe)
    every = sorted({t for a in recipe.agents for t in [*a.vocabulary.subjects, *candidates(a)]})

    def oracle(term):  # independent oracle: whole-phrase spellings, article dropped
        out = set()
        for name in mentions.names_of(term):
            base = " ".join(name.lower().split())
            out |= {base, base + "s", base + "es"}
            if base.endswith("s"):
                out.add(base[:-1])
        return out

    spelled = {t: oracle(t) for t in every}

    def shows(text, term):
        low = text.lower()
        return any(s in low and _says(text, s) for s in spelled[term])

    checked = 0
    for agent in recipe.agents:
        v = agent.vocabulary
        for thing in [*v.subjects, *candidates(agent)]:
            for shown in sorted(spelled[thing])[:2]:
                caption = f"a {v.styles[0]} {v.subjects[0]} with {shown}"
                present = [t for t in every if shows(caption, t)]
                terms = absent_terms(recipe, agent, caption, mentions)
                for seed in range(3):
                    if not terms:
                        break
                    rng = random.Random(seed)
                    term = rng.choice(terms)
                    _, edit = no_change_instruction(agent, term, rng)
                    assert not re.search(r"\bthe (a|an|the|some) ", edit), edit
                    for t in present:
                        assert not shows(edit, t), (caption, edit, t)
                    checked += 1
    assert checked > 500


def test_synonyms_count_as_mentions(mini_build):
    mentions = Mentions(mini_build.recipe)
    room = mini_build.recipe.agent("living-room")
    for caption in ("a living room with a couch", "a living room with two settees",
                    "a living room with sofas"):
        assert "sofa" not in absent_terms(mini_build.recipe, room, caption, mentions)
    assert "sofa" in absent_terms(mini_build.recipe, room, "a living room with a rug", mentions)


def test_stage_ratio_per_split_and_determinism(mini_build):
    make_build(mini_build, samples=4, keep_every=1)
    mini_build.update(["augment.ratio=0.2"])
    res = run_augment(mini_build)
    samples = list(mini_build.records("augment"))
    assert res.records == len(samples) > 0
    kept = [s["pair_id"] for s in mini_build.records("filter") if s["keep"]]
    pairs = {p["id"]: p for p in mini_build.records("generate")}
    for s in samples:
        assert s["no_change"] is True and s["output"] == s["input"]
        assert s["images"]["input"] == s["images"]["output"] == pairs[s["pair_id"]]["images"][
            "input"]
        assert s["pair_id"] in kept
    # both prospective splits get their share (at least one each)
    triples = {t["id"]: t for t in mini_build.records("captions")}
    nodes = {pid: row_nodes(pairs[pid]["triple_id"], [triples[pairs[pid]["triple_id"]]["input"],
                                                     triples[pairs[pid]["triple_id"]]["output"]])
             for pid in kept}
    row_split, node_split = split_rows(nodes, 0.1, 0)
    per_split = [node_split[f"c:{caption_key(s['input'])}"] for s in samples]
    assert set(per_split) == {"train", "test"}
    # each split gets round(ratio x its kept pairs), at least one
    for split in ("train", "test"):
        n = sum(v == split for v in row_split.values())
        assert per_split.count(split) == max(1, round(0.2 * n)), (split, n)
    # a re-run does nothing; a forced re-run writes the same samples
    assert run_augment(mini_build).skipped
    run_augment(mini_build, force=True)
    assert [s["id"] for s in mini_build.records("augment")] == [s["id"] for s in samples]
    # another seed picks differently
    mini_build.update(["augment.seed=7"])
    run_augment(mini_build)
    assert [s["id"] for s in mini_build.records("augment")] != [s["id"] for s in samples]


def test_ratio_zero_and_cli(mini_build):
    from dsbuild.cli import main

    make_build(mini_build, samples=2)
    mini_build.update(["augment.ratio=0"])
    assert run_augment(mini_build).records == 0
    with pytest.raises(SystemExit) as exc:
        main(["augment", str(mini_build.root), "--set", "augment.ratio=2"])
    assert exc.value.code == 2


@pytest.mark.server
def test_llm_backend_checked_and_cached(mini_build):
    """The openai backend through the real SDK against a scripted local server: good replies
    are used, bad ones (present thing, not JSON) fall back to the template; re-runs are cached."""
    import json

    from openai_server import OpenAIServer, chat

    def handler(req, n):
        user = req["messages"][-1]["content"]
        caption = user.split("\n")[0].removeprefix("Caption: ")
        absent = user.split("NOT in the image: ")[1].split(", ")
        if n % 3 == 1:  # names something the caption mentions
            present = "sofa" if "sofa" in caption else "armchair"
            return chat(json.dumps({"target": absent[0], "edit": f"remove the {present} "
                                    f"and the {absent[0]}"}))
        if n % 3 == 2:
            return chat("I cannot help with that.")
        return chat("```json\n" + json.dumps({"target": absent[0],
                                              "edit": f"please remove the {absent[0]}"}) + "\n```")

    make_build(mini_build, samples=4, keep_every=1)
    with OpenAIServer(handler=handler) as srv:
        # one request at a time: the handler picks its reply by request number
        mini_build.update(["augment.ratio=0.5", "augment.backend=openai",
                           f"augment.base_url={srv.base_url}", "augment.model=test-model",
                           "augment.concurrency=1"])
        res = run_augment(mini_build)
        samples = list(mini_build.records("augment"))
        sent = len(srv.chat_requests)
        assert sent == len(samples) >= 3
        llm = res.stats["llm"]
        assert llm["rejected"]["instruction names something the caption mentions"] >= 1
        assert llm["rejected"]["not JSON with target and edit"] >= 1
        by = {s["source"]["backend"] for s in samples}
        assert by == {"openai", "template"}
        mentions = Mentions(mini_build.recipe)
        vocab = {t for a in mini_build.recipe.agents
                 for t in [*a.vocabulary.subjects, *a.vocabulary.objects, *a.vocabulary.features]}
        for s in samples:
            # the instruction (whoever wrote it) names nothing the caption shows, by the
            # test's own spelling rules rather than the stage's
            shown = [t for t in vocab if any(_says(s["input"], f) for f in _surface(t, mentions))]
            named = [t for t in shown if any(_says(s["edit"], f) for f in _surface(t, mentions))]
            assert not named, (s["input"], s["edit"], named)
            if s["source"]["backend"] == "openai":
                assert s["edit"].startswith("please remove the ")
                assert s["operation"] == "remove"
        run_augment(mini_build, force=True)
        assert len(srv.chat_requests) == sent  # every reply came from the build's cache
        assert [s["id"] for s in mini_build.records("augment")] == [s["id"] for s in samples]


def test_augment_cli_reports(mini_build):
    from click.testing import CliRunner

    from dsbuild.cli import cli

    make_build(mini_build, samples=3, keep_every=1)
    r = CliRunner().invoke(cli, ["augment", str(mini_build.root), "--set", "augment.ratio=0.3"])
    assert r.exit_code == 0, r.output
    assert "augment rank 0/1: done" in r.output and "no-change samples from 18 kept" in r.output
    r = CliRunner().invoke(cli, ["augment", str(mini_build.root)])
    assert "already done (skipped)" in r.output


@pytest.mark.server
def test_llm_requests_run_concurrently_and_resume_after_failure(mini_build):
    """``augment.concurrency`` requests are in flight at once and the samples are exactly those
    of concurrency=1; a request that still fails after its retries leaves the rank unfinished,
    and the re-run asks only for it (the rest come from the cache) and writes the same."""
    import json
    import shutil

    from openai_server import OpenAIServer, chat, delay, error

    from dsbuild.core.errors import DsbuildError

    def handler(req, n):  # the answer depends on the request alone, never on arrival order
        user = req["messages"][-1]["content"]
        caption = user.split("\n")[0].removeprefix("Caption: ")
        absent = user.split("NOT in the image: ")[1].split(", ")
        target = absent[len(caption) % len(absent)]
        wait = 0.01 + 0.03 * (len(user) % 4)  # uneven, so replies come back out of order
        return delay(wait, chat(json.dumps({"target": target, "edit": f"remove the {target}"})))

    make_build(mini_build, samples=4, keep_every=1)
    cache = mini_build.cache_dir / "augment"
    with OpenAIServer(handler=handler) as srv:
        mini_build.update(["augment.ratio=0.5", "augment.backend=openai",
                           f"augment.base_url={srv.base_url}", "augment.model=test-model",
                           "augment.concurrency=1"])
        run_augment(mini_build)
        sequential = list(mini_build.records("augment"))
        n = len(srv.chat_requests)
        assert n == len(sequential) >= 8 and srv.max_in_flight == 1
        assert {s["source"]["backend"] for s in sequential} == {"openai"}

        shutil.rmtree(cache)
        srv.max_in_flight = 0
        mini_build.update(["augment.concurrency=4"])
        res = run_augment(mini_build, force=True)
        assert len(srv.chat_requests) == 2 * n and srv.max_in_flight == 4
        assert list(mini_build.records("augment")) == sequential
        assert res.stats["llm"]["sent"] == n and res.stats["llm"]["failed"] == 0
        assert res.stats["llm"]["usage"]["total_tokens"] > 0

        shutil.rmtree(cache)
        mini_build.update(["augment.concurrency=1", "augment.max_retries=1",
                           "augment.retry_backoff=0.01"])
        srv.queue(error(503), error(503))  # the first request fails twice: it gives up
        with pytest.raises(DsbuildError, match="1 augment request.*failed after 1 retries"):
            run_augment(mini_build, force=True)
        assert not mini_build.is_complete("augment")
        mini_build.update(["augment.concurrency=4"])
        before = len(srv.chat_requests)
        res = run_augment(mini_build)
        assert len(srv.chat_requests) - before == 1 and res.stats["llm"]["sent"] == 1
        assert mini_build.is_complete("augment")
        resumed = sorted(mini_build.records("augment"), key=lambda s: s["id"])
        assert resumed == sorted(sequential, key=lambda s: s["id"])
