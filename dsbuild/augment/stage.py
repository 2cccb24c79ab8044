"""The augment stage: no-change samples for a share of the kept pairs.

For each chosen pair the instruction names a thing the input caption does not mention
(remove it, or change its colour/material/style); output image = input image and output
caption = input caption, ``no_change: true``. The choice is seeded and stratified by the
train/test split (``split`` settings, as export uses), so both splits get no-change samples at the configured ratio.
"""

from __future__ import annotations

import math
import random

from dsbuild.augment.llm import OFFLINE_HINT, Ask, LLMInstructions
from dsbuild.augment.mentions import (
    Mentions,
    absent_terms,
    bare,
    names_any,
    present_terms,
    words,
)
from dsbuild.core import join
from dsbuild.core.build import Build, StageResult, shard_of
from dsbuild.core.config import Agent
from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.split import row_nodes, split_rows
from dsbuild.core.text import article
from dsbuild.llm.client import check_endpoint

REMOVE = ("remove the {x}", "take away the {x}", "get rid of the {x}", "delete the {x}")
REMOVE_VERBS = frozenset({"remove", "delete", "take", "get", "eliminate", "clear"})
CHANGE_COLOUR = ("make the {x} {v}", "turn the {x} {v}", "paint the {x} {v}")
CHANGE_MATERIAL = ("change the {x} to {v}", "make the {x} out of {v}")
CHANGE_STYLE = ("give the {x} {a} {v} look", "make the {x} {v}")


def no_change_instruction(agent: Agent, term: str, rng: random.Random) -> tuple[str, str]:
    """(operation, instruction) naming ``term``: remove it or change one of its properties."""
    v = agent.vocabulary
    term = bare(term)  # "a lower shelf" -> "remove the lower shelf"
    options: list[tuple[str, tuple[str, ...], list[str]]] = [("remove", REMOVE, [""])]
    for templates, values in ((CHANGE_COLOUR, v.colours), (CHANGE_MATERIAL, v.materials),
                              (CHANGE_STYLE, v.styles)):
        if values:
            options.append(("change", templates, values))
    op, templates, values = rng.choice(options)
    value = rng.choice(values)
    text = rng.choice(templates).format(x=term, v=value, a=article(value))  # "an art deco look"
    return op, text


def kept_pairs(build: Build) -> list[tuple[dict, dict, dict]]:
    """(pair, triple, score) of every pair the filter kept, in pair-id order."""
    out = [tuple(j) for j in join.scored_pairs(build, kept_only=True)
           if not j.triple.get("no_change")]
    return sorted(out, key=lambda x: x[0]["id"])


def choose_pairs(build: Build, kept: list[tuple[dict, dict, dict]]
                 ) -> list[tuple[int, list[tuple[dict, dict]]]]:
    """Per prospective split: how many samples it wants (``ratio`` of its pairs, at least one)
    and its pairs in seeded order; later pairs stand in where a caption leaves nothing absent."""
    a, e = build.config.augment, build.config.split
    if a.ratio <= 0 or not kept:
        return []
    rows = {p["id"]: row_nodes(t["id"], [t["input"], t["output"]], session=p.get("session_id"))
            for p, t, _ in kept}
    row_split, _ = split_rows(rows, e.test_ratio, e.seed)
    chosen = []
    for split in ("train", "test"):
        members = [(p, t) for p, t, _ in kept if row_split[p["id"]] == split]
        if not members:
            continue
        members.sort(key=lambda x: content_id("augment", a.seed, x[0]["id"]))
        want = max(1, math.floor(a.ratio * len(members) + 0.5))
        chosen.append((want, members))
    return chosen


def sample_rng(build: Build, pair: dict) -> random.Random:
    """The seeded RNG of one pair's sample: the same pair always draws the same."""
    return random.Random(content_id("augment", build.config.augment.seed, pair["id"]))


def llm_ask(build: Build, pair: dict, triple: dict, terms: list[str], present: list[str],
            rng: random.Random) -> Ask:
    """The LLM request for a pair: up to 12 of its absent ``terms`` (a draw from ``rng``)."""
    shown = sorted(terms) if len(terms) <= 12 else sorted(rng.sample(sorted(terms), 12))
    return Ask(triple["input"], shown, present, f"{build.config.augment.seed}:{pair['id']}")


def make_sample(build: Build, mentions: Mentions, pair: dict, triple: dict,
                terms: list[str], present: list[str], rng: random.Random | None = None,
                got: tuple[str, str] | None = None, model: str | None = None) -> dict:
    """One no-change sample for a pair: the LLM's checked (term, edit) ``got``, else a template
    instruction naming one of ``terms`` (things absent from the input caption) and none of
    ``present`` (things it shows). ``rng`` is the pair's ``sample_rng``, after ``llm_ask``."""
    agent = _agent(build, triple)
    rng = rng if rng is not None else sample_rng(build, pair)
    backend = "template"
    if got is not None:
        term, edit = got
        lead = words(edit)[:3]  # "Please remove the rug." is a removal too
        op = "remove" if any(w in REMOVE_VERBS for w in lead) else "change"
        backend = "openai"
    else:
        term = rng.choice(sorted(terms))
        op, edit = no_change_instruction(agent, term, rng)
        if names_any(edit, present, mentions):
            # a colour/material/style word that is also a thing the caption shows
            op, edit = "remove", REMOVE[0].format(x=bare(term))
    img = pair["images"]["input"]
    return {
        "id": content_id("no_change", pair["id"], edit), "pair_id": pair["id"],
        "source_pair_id": pair["id"],
        "triple_id": triple["id"], "recipe": triple.get("recipe", build.recipe.name),
        "agent": triple["agent"], "level": triple["level"], "operation": op,
        "input": triple["input"], "edit": edit, "output": triple["input"], "target": term,
        "no_change": True, "seed": pair.get("seed"), "params": pair.get("params"),
        "model": pair.get("model"), "images": {"input": img, "output": img},
        "source": {"backend": backend, "model": model if got is not None else None},
    }


def run_augment(build: Build, rank: int = 0, world_size: int = 1, *,
                force: bool = False) -> StageResult:
    """Write this rank's no-change samples to augment/rNNNNN.jsonl (resumable)."""

    def work(writer) -> dict:
        kept = kept_pairs(build)
        mentions = Mentions(build.recipe)
        llm = None
        if build.config.augment.backend == "openai":
            llm = LLMInstructions(build, mentions)
        todo = []  # (pair, triple, terms, present) of the samples this rank writes, in order
        short = 0
        for want, members in choose_pairs(build, kept):
            have = 0
            for pair, triple in members:
                if have >= want:
                    break
                mine = shard_of(pair["id"], world_size) == rank
                if mine and pair["id"] in writer.done:  # written before an interruption
                    have += 1
                    continue
                present = present_terms(build.recipe, triple["input"], mentions)
                terms = absent_terms(build.recipe, _agent(build, triple), triple["input"],
                                     mentions, present)
                if not terms:
                    continue
                have += 1
                if mine:
                    todo.append((pair, triple, terms, present))
            short += want - have
        rngs = [sample_rng(build, job[0]) for job in todo]
        if llm is None:
            for job, rng in zip(todo, rngs, strict=True):
                writer.write(make_sample(build, mentions, *job, rng))
        else:  # requests run concurrently; samples are written in ``todo`` order all the same
            asks = [llm_ask(build, *job, rng) for job, rng in zip(todo, rngs, strict=True)]
            llm.answer(asks, lambda i, got: writer.write(
                make_sample(build, mentions, *todo[i], rngs[i], got, llm.model)))
        stats = {"kept_pairs": len(kept), "no_change": len(writer.records),
                 "ratio": build.config.augment.ratio, "short": short,
                 "backend": build.config.augment.backend}
        if llm is not None:
            stats["llm"] = llm.stats()
            if llm.failed:
                a = build.config.augment
                raise DsbuildError(
                    f"{llm.failed} augment request(s) to {a.base_url or 'the endpoint'} failed "
                    f"after {a.max_retries} retries ({'; '.join(stats['llm']['errors'][:3])}); "
                    "the other samples are kept: run the same command again to resume"
                )
        return stats

    if build.config.augment.backend == "openai":  # fail before any work: missing SDK or key
        check_endpoint(build.config.augment, "augment", OFFLINE_HINT)
    return build.run_stage("augment", rank, world_size, work, force=force)


def _agent(build: Build, triple: dict) -> Agent:
    try:
        return build.recipe.agent(triple["agent"])
    except KeyError:
        raise DsbuildError(f"triple {triple['id']}: agent {triple['agent']!r} is not in recipe "
                           f"{build.recipe.name!r}") from None
