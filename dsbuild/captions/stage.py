"""Run the captions stage for one rank: agents → candidates → validator → triples/rNNNNN.jsonl.

The work unit is the agent: agents (objects first, then rooms) are dealt round-robin over
ranks, so each rank owns whole agents and can reach their counts and drop duplicates alone.
Both backends are deterministic for a seed (template) or a cache (openai), which is what lets
a killed rank resume: replayed triples have the same ids and the shard writer skips them.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from dsbuild.build import Build, StageResult, check_rank
from dsbuild.captions.prompt import NOT_JSON, build_messages, parse_lines
from dsbuild.captions.report import write_report
from dsbuild.captions.template import TemplateComposer
from dsbuild.captions.validate import FIELDS, Checked, Validator, check_examples, clean_text
from dsbuild.config import Agent, Recipe, apply_overrides
from dsbuild.errors import DsbuildError
from dsbuild.hashing import content_id
from dsbuild.llm import ChatClient, RequestCache, check_endpoint
from dsbuild.progress import progress
from dsbuild.records import ShardWriter
from dsbuild.settings.captions import CaptionsSettings

AUTO_ROUNDS = 8
TEMPLATE_ATTEMPTS = 50  # candidates per wanted triple before the template backend gives up
MAX_EXAMPLES = 3  # rejected lines kept per reason in the report
OFFLINE_HINT = "use --backend template to write captions offline"


def resolve_backend(settings: CaptionsSettings) -> str:
    """'auto' means openai when an endpoint or key is configured, else the offline template."""
    if settings.backend != "auto":
        return settings.backend
    if settings.base_url or os.environ.get(settings.api_key_env):
        return "openai"
    return "template"


def agent_target(agent: Agent, settings: CaptionsSettings) -> int:
    """An agent's triple count after count_scale and limit."""
    n = max(1, round(agent.count * settings.count_scale))
    return min(n, settings.limit) if settings.limit else n


def shard_agents(recipe: Recipe, rank: int, world_size: int) -> list[Agent]:
    """This rank's agents: the hierarchy order (objects, then rooms) dealt round-robin."""
    check_rank(rank, world_size)
    return recipe.ordered_agents()[rank::world_size]


def triple_record(recipe: Recipe, agent: Agent, triple: dict, backend: str,
                  model: str | None) -> dict:
    """A Triple record (DESIGN.md): id is the hash of recipe/agent/input/edit/output."""
    inp, edit, out = triple["input"], triple["edit"], triple["output"]
    return {
        "id": content_id(recipe.name, agent.name, inp, edit, out), "recipe": recipe.name,
        "agent": agent.name, "level": agent.level, "operation": triple["operation"],
        "input": inp, "edit": edit, "output": out,
        "source": {"backend": backend, "model": model}, "no_change": False,
    }


@dataclass
class AgentTally:
    """Per-agent counts for the report."""

    level: str
    target: int
    kept: int = 0
    candidates: int = 0
    requests: int = 0
    surplus: int = 0
    rejected: Counter = field(default_factory=Counter)
    operations: Counter = field(default_factory=Counter)  # of the triples written this run

    def as_dict(self) -> dict:
        return {"level": self.level, "target": self.target, "kept": self.kept,
                "candidates": self.candidates, "requests": self.requests,
                "surplus": self.surplus, "rejected": dict(sorted(self.rejected.items())),
                "operations": dict(sorted(self.operations.items()))}


class CaptionsRun:
    """One rank's captions work: feeds candidates through the validator into the writer."""

    def __init__(self, build: Build, agents: list[Agent], backend: str, writer: ShardWriter,
                 show_progress: bool = True):
        self.build, self.recipe, self.agents = build, build.recipe, agents
        self.settings = build.config.captions
        self.backend = backend
        self.writer = writer
        self.validator = Validator.from_settings(self.settings)
        for a in agents:
            self.validator.remember_examples(a)
        self.tallies = {a.name: AgentTally(a.level, agent_target(a, self.settings))
                        for a in agents}
        self.examples: dict[str, list[str]] = {}
        self.model: str | None = None
        # A resumed rank: triples already in the partial shard count as kept and seen; when
        # the (deterministic) stream replays them they are skipped, not counted twice.
        by_name = {a.name: a for a in agents}
        self.resumed: set[str] = set()
        for rec in writer.records:
            agent = by_name.get(rec.get("agent"))
            if agent is not None and rec.get("id"):
                self.tallies[agent.name].kept += 1
                self.validator.remember(rec, agent)
                self.resumed.add(rec["id"])
        total = sum(t.target for t in self.tallies.values())
        done = sum(min(t.kept, t.target) for t in self.tallies.values())
        self.bar = progress(total=total, desc=f"captions r{build_rank_label(writer)}",
                            unit="triple", initial=done) if show_progress else None

    # ------------------------------------------------------------------ shared
    def offer(self, agent: Agent, cand: object, raw: str | None = None) -> bool:
        """Validate one candidate and write it if it passes; True once the agent is full."""
        tally = self.tallies[agent.name]
        if tally.kept >= tally.target:
            tally.surplus += 1
            return True
        if self.resumed and self._resumed_id(agent, cand) in self.resumed:
            return False  # written before the interruption; already counted
        tally.candidates += 1
        res = (self.validator.reject("not_json") if cand is NOT_JSON
               else self.validator.check(cand, agent))
        if not res.ok:
            self._rejected(tally, res, raw if raw is not None else cand)
            return False
        self.writer.write(triple_record(self.recipe, agent, res.triple, self.backend, self.model))
        tally.kept += 1
        tally.operations[res.operation] += 1
        if self.bar is not None:
            self.bar.update(1)
        return tally.kept >= tally.target

    def _resumed_id(self, agent: Agent, cand: object) -> str | None:
        if not isinstance(cand, dict) or not all(isinstance(cand.get(f), str) for f in FIELDS):
            return None
        return content_id(self.recipe.name, agent.name,
                          *(clean_text(cand[f]) for f in FIELDS))

    def _rejected(self, tally: AgentTally, res: Checked, raw: object) -> None:
        tally.rejected[res.reason] += 1
        ex = self.examples.setdefault(res.reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(str(raw)[:300])
        if self.bar is not None:
            self.bar.set_postfix(rejected=sum(self.validator.rejected.values()), refresh=False)

    def stats(self, started: float, requests: dict | None = None) -> dict:
        rejected = Counter()
        for t in self.tallies.values():
            rejected.update(t.rejected)
        short = {n: t.target - t.kept for n, t in self.tallies.items() if t.kept < t.target}
        return {
            "backend": self.backend, "model": self.model,
            "target": sum(t.target for t in self.tallies.values()),
            "kept": sum(t.kept for t in self.tallies.values()),
            "rejected": dict(sorted(rejected.items())),
            "short": short,
            "agents": {n: t.as_dict() for n, t in self.tallies.items()},
            "requests": requests,
            "rejected_examples": self.examples,
            "elapsed_s": round(time.perf_counter() - started, 3),
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # ------------------------------------------------------------------ template
    def run_template(self) -> dict:
        started = time.perf_counter()
        for agent in self.agents:
            tally = self.tallies[agent.name]
            stream = TemplateComposer(agent, self.settings.seed).candidates()
            for _ in range(max(200, tally.target * TEMPLATE_ATTEMPTS)):
                if self.offer(agent, next(stream)):
                    break
        return self.stats(started)

    # ------------------------------------------------------------------ openai
    def run_openai(self) -> dict:
        started = time.perf_counter()
        backend = ChatClient(self.settings, RequestCache(self.build.cache_dir / "captions"),
                             section="captions", offline_hint=OFFLINE_HINT)
        self.model = backend.model
        asyncio.run(self._openai(backend))
        stats = self.stats(started, backend.stats.as_dict())
        if backend.stats.failed and stats["short"]:
            raise DsbuildError(
                f"{backend.stats.failed} request(s) to {self.settings.base_url or 'the endpoint'} "
                f"failed after {self.settings.max_retries} retries "
                f"({'; '.join(backend.stats.errors[:3])}) and agents "
                f"{sorted(stats['short'])} are short of their counts; run the same command "
                "again to resume (answers already received are reused from the cache)"
            )
        return stats

    async def _openai(self, backend: ChatClient) -> None:
        s = self.settings
        rounds = s.max_rounds or AUTO_ROUNDS
        async with backend:
            for agent in self.agents:
                tally = self.tallies[agent.name]
                sample = 0
                for _ in range(rounds):
                    need = tally.target - tally.kept
                    if need <= 0:
                        break
                    idx = list(range(sample, sample + math.ceil(need / s.per_request)))
                    sample += len(idx)
                    tally.requests += len(idx)
                    replies = await asyncio.gather(*(
                        backend.complete(
                            build_messages(self.recipe, agent, s.per_request, i, s.seed), i)
                        for i in idx))
                    for reply in replies:  # in sample order: the same replies keep the same lines
                        if reply is None:
                            continue
                        for line, cand in zip_lines(reply["content"]):
                            self.offer(agent, cand, line)


def zip_lines(content: str) -> list[tuple[str, object]]:
    """(raw line, parsed candidate) pairs of a reply, for the report's rejected examples."""
    cands = parse_lines(content)
    raw = [ln.strip() for ln in (content or "").splitlines()
           if ln.strip() and not ln.strip().startswith("```")]
    if len(raw) != len(cands):
        raw = [str(c) for c in cands]
    return list(zip(raw, cands, strict=True))


def build_rank_label(writer: ShardWriter) -> str:
    return writer.path.stem.lstrip("r").lstrip("0") or "0"


def run_captions(build: Build, rank: int = 0, world_size: int = 1, *,
                 backend: str | None = None, force: bool = False,
                 overrides: list[str] | tuple[str, ...] = (),
                 show_progress: bool = True) -> StageResult:
    """Write this rank's caption triples (resumable) and refresh reports/captions.json."""
    overrides = list(overrides) + ([f"captions.backend={backend}"] if backend else [])
    # check the recipe's examples under the new settings before saving them into dsbuild.yaml
    config = apply_overrides(build.config, overrides)
    s = config.captions
    check_examples(build.recipe, config.recipe_path, s.max_changed_fraction, s.max_diff_spans)
    if overrides:
        build.config = config
        build.save_config()
    chosen = resolve_backend(s)
    agents = shard_agents(build.recipe, rank, world_size)
    if chosen == "openai":  # fail before any work: missing SDK or key
        check_endpoint(s, "captions", OFFLINE_HINT)

    def work(writer: ShardWriter) -> dict:
        run = CaptionsRun(build, agents, chosen, writer, show_progress=show_progress)
        try:
            return run.run_template() if chosen == "template" else run.run_openai()
        finally:
            run.close()

    result = build.run_stage("captions", rank, world_size, work, force=force)
    result.report = write_report(build)
    return result
