"""Run the captions stage for one rank: agents → candidates → validator → triples/rNNNNN.jsonl.

The work unit is the agent: agents (objects first, then rooms) are dealt round-robin over
ranks, so each rank owns whole agents and can reach their counts and drop duplicates alone.
Both backends are deterministic for a seed (template) or a cache (openai), which is what lets
a killed rank resume exactly: a resumed run replays the same candidates through the same
validator in the same rounds (sample numbers and the round budget as in an uninterrupted run;
cached replies cost nothing), the shard writer skips the triples already written, and every
count (kept, rejected by reason, surplus) comes out as if the run had never stopped. What a
replay cannot rebuild, the requests each attempt paid for, is kept beside the partial shard in
``rNNNNN.jsonl.partial.stats.json`` and added up at the end.

A rank whose output is empty, or under ``captions.min_share`` of its target, raises StageFailed:
no completion marker, exit status 1, the partial shard and the request cache kept.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dsbuild.captions import STAGE
from dsbuild.captions.grounding import (
    PhotoComposer,
    PhotoGrounder,
    assign_photos,
    edit_targets,
    ground_check,
    queried,
    things,
)
from dsbuild.captions.prompt import NOT_JSON, build_messages, build_session_messages, parse_lines
from dsbuild.captions.sessions import (
    SessionChecked,
    SessionComposer,
    SessionTally,
    check_session,
    expected_nodes,
    merge,
    session_target,
)
from dsbuild.captions.settings import CaptionsSettings
from dsbuild.captions.template import TemplateComposer
from dsbuild.captions.validate import FIELDS, Checked, Validator, check_examples, clean_text
from dsbuild.core import sessions as S
from dsbuild.core.build import Build, StageResult, check_rank
from dsbuild.core.config import Agent, Recipe, apply_overrides
from dsbuild.core.errors import StageFailed
from dsbuild.core.hashing import content_id
from dsbuild.core.progress import progress, retry_postfix, update_postfix
from dsbuild.core.records import ShardWriter, shard_name, write_json
from dsbuild.llm.client import ChatClient, RequestCache, check_endpoint, sum_request_stats

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


def agent_target(agent: Agent, settings: CaptionsSettings,
                 photos: dict[str, list[dict]] | None = None) -> int:
    """An agent's triple count after count_scale and per_agent; in a build with photos,
    ``photos.per_photo`` for each photo the agent was given."""
    if photos is not None:
        return settings.photos.per_photo * len(photos.get(agent.name, []))
    n = max(1, round(agent.count * settings.count_scale))
    return min(n, settings.per_agent) if settings.per_agent else n


def shard_agents(recipe: Recipe, rank: int, world_size: int) -> list[Agent]:
    """This rank's agents: the hierarchy order (objects, then rooms) dealt round-robin."""
    check_rank(rank, world_size)
    return recipe.ordered_agents()[rank::world_size]


def photo_assignment(build: Build, photos: dict[str, dict] | None = None
                     ) -> dict[str, list[dict]] | None:
    """The build's photos per agent name (None: a build without photos)."""
    from dsbuild.core.photos import photos_by_id

    photos = photos_by_id(build) if photos is None else photos
    if not photos:
        return None
    return assign_photos(build.recipe.ordered_agents(), list(photos.values()))


def expected(build: Build, world_size: int) -> list[int]:
    """Triples each rank is to write (its agents' targets): the driver's bar total."""
    s = build.config.captions
    assigned = photo_assignment(build)
    return [sum(agent_target(a, s, assigned) for a in shard_agents(build.recipe, r, world_size))
            for r in range(world_size)]


def triple_record(recipe: Recipe, agent: Agent, triple: dict, backend: str,
                  model: str | None, photo: dict | None = None) -> dict:
    """A Triple record (dsbuild.core.schema.Triple): id is the hash of recipe/agent/input/edit/output;
    a triple written from a photo carries its id and provenance."""
    inp, edit, out = triple["input"], triple["edit"], triple["output"]
    rec = {
        "id": content_id(recipe.name, agent.name, inp, edit, out), "recipe": recipe.name,
        "agent": agent.name, "level": agent.level, "operation": triple["operation"],
        "input": inp, "edit": edit, "output": out,
        "source": {"backend": backend, "model": model}, "no_change": False,
    }
    if photo is not None:
        rec.update(photo_id=photo["id"], license=photo.get("license"),
                   photo_source=photo.get("source"), attribution=photo.get("attribution"))
    return rec


def node_record(recipe: Recipe, agent: Agent, node: dict, session: str, backend: str,
                model: str | None, photo: dict | None = None) -> dict:
    """The Triple record of a session node (dsbuild.core.sessions): id = ``node_id``, which
    hashes the session and the parent too; input = the parent's output. A session from a
    photo carries the photo on every node."""
    rec = triple_record(recipe, agent, node["triple"], backend, model, photo)
    rec["id"] = node["node_id"]
    rec.update(session_id=session, node_id=node["node_id"], parent_id=node["parent_id"],
               turn=node["turn"])
    return rec


@dataclass
class AgentTally:
    """Per-agent counts for the report."""

    level: str
    target: int
    kept: int = 0  # triples of this agent in the shard
    streamed: int = 0  # valid candidates the stream has given so far (drives the rounds)
    candidates: int = 0
    requests: int = 0
    surplus: int = 0  # valid lines that came after the agent was full
    rejected: Counter = field(default_factory=Counter)
    operations: Counter = field(default_factory=Counter)  # of the kept triples
    sessions: SessionTally | None = None  # captions.sessions.share > 0 (session turns first)

    def single_target(self) -> int:
        """Single edits wanted: the target less the session turns written (an agent's sessions
        come before its single edits, so a resumed run sees the same number)."""
        if self.sessions is None:
            return self.target
        return self.target - min(self.target, self.sessions.kept)

    def single_kept(self) -> int:
        return self.kept - (self.sessions.kept if self.sessions is not None else 0)

    def as_dict(self) -> dict:
        return {"level": self.level, "target": self.target, "kept": self.kept,
                "candidates": self.candidates, "requests": self.requests,
                "surplus": self.surplus, "rejected": dict(sorted(self.rejected.items())),
                "operations": dict(sorted(self.operations.items())),
                **({"sessions": self.sessions.as_dict()} if self.sessions is not None else {})}


class CaptionsRun:
    """One rank's captions work: feeds candidates through the validator into the writer."""

    def __init__(self, build: Build, agents: list[Agent], backend: str, writer: ShardWriter,
                 log: AttemptLog | None = None, show_progress: bool = True,
                 photos: dict[str, list[dict]] | None = None, detector=None):
        self.build, self.recipe, self.agents = build, build.recipe, agents
        self.settings = build.config.captions
        self.backend = backend
        self.writer = writer
        self.validator = Validator.from_settings(self.settings)
        for a in agents:
            self.validator.remember_examples(a)
        self.tallies = {a.name: AgentTally(a.level, agent_target(a, self.settings, photos))
                        for a in agents}
        # sessions: an agent's share of its target (with photos: of each photo's per_photo)
        ss = self.settings.sessions
        self.photo_sessions = (session_target(self.settings.photos.per_photo, ss)
                               if photos is not None else 0)  # session turns per photo
        if ss.share > 0:
            for name, t in self.tallies.items():
                t.sessions = SessionTally(
                    session_target(t.target, ss) if photos is None else
                    self.photo_sessions * len(photos.get(name, [])))
        # a build with photos: each agent's photos, triples per photo (streamed counts for the
        # rounds, kept what the shard holds; single edits and session turns apart), the
        # detector check on the photo
        self.photos = photos
        self.photo_streamed: Counter = Counter()
        self.photo_kept: Counter = Counter(r.get("photo_id") for r in writer.records
                                           if r.get("photo_id") and not S.is_session(r))
        self.photo_s_streamed: Counter = Counter()
        self.photo_s_kept: Counter = Counter(r.get("photo_id") for r in writer.records
                                             if r.get("photo_id") and S.is_session(r))
        self.grounder = (PhotoGrounder(build, detector, quiet=not show_progress)
                         if photos is not None and self.settings.photos.ground else None)
        self.grounded: Counter = Counter()  # triples checked on their photo, by outcome
        self.examples: dict[str, list[str]] = {}
        self.model: str | None = None
        self.log = log
        self._saved: tuple = (0, 0, 0, len(writer.records))  # what the log last recorded
        # A resumed rank: the partial shard's triples are kept and seen, and the stream is
        # replayed from its start (cached replies, the template's seed). Each of them counts
        # once more for the rounds when the replay brings it back (``pending`` until then),
        # so sample numbers and rounds come out as in an uninterrupted run.
        by_name = {a.name: a for a in agents}
        self.pending: set[str] = set()
        for rec in writer.records:
            agent = by_name.get(rec.get("agent"))
            if agent is not None and rec.get("id"):
                tally = self.tallies[agent.name]
                tally.kept += 1
                tally.operations[rec.get("operation")] += 1
                if S.is_session(rec) and tally.sessions is not None:
                    tally.sessions.kept += 1
                self.validator.remember(rec, agent)
                self.pending.add(rec["id"])
        self.resumed = len(self.pending)
        total = sum(t.target for t in self.tallies.values())
        done = sum(min(t.kept, t.target) for t in self.tallies.values())
        self.bar = progress(total=total, desc=f"captions r{build_rank_label(writer)}",
                            unit=STAGE.unit, initial=done) if show_progress else None

    # ------------------------------------------------------------------ shared
    def offer(self, agent: Agent, cand: object, raw: str | None = None,
              photo: dict | None = None) -> bool:
        """Validate one candidate and write it if it passes; True once the agent (with
        ``photo``: that photo's ``per_photo``) is full.

        Every line is validated, also after the agent is full: a bad one is rejected with its
        reason, a good one counts as surplus. A triple the partial shard already holds comes
        back when a resumed run replays its stream: it counts for the rounds, is not written.
        A triple from a photo must keep the photo's caption as its input and pass the
        grounding check on the photo (a counted rejection otherwise).
        """
        tally = self.tallies[agent.name]
        tally.candidates += 1
        if photo is None:
            target, streamed, kept = tally.single_target(), tally.streamed, tally.single_kept()
        else:
            target = self.photo_single_target(photo)
            streamed, kept = self.photo_streamed[photo["id"]], self.photo_kept[photo["id"]]
        if self.pending:
            rid = self._candidate_id(agent, cand)
            if rid in self.pending:  # written before the interruption (kept and seen already)
                self.pending.discard(rid)
                tally.streamed += 1
                if photo is not None:
                    self.photo_streamed[photo["id"]] += 1
                    if self.grounder is not None:  # it passed the check when written
                        self.grounded["grounded"] += 1
                return streamed + 1 >= target
        full = streamed >= target
        if cand is NOT_JSON:
            res = self.validator.reject("not_json")
        elif photo is not None and not self._photo_input(cand, photo):
            res = self.validator.reject("photo_input_changed")
        else:
            res = self.validator.check(cand, agent, grounded=photo is not None)
        if res.ok and photo is not None and self.grounder is not None:
            reason = self._ground(agent, res.triple, photo)
            self.grounded[reason or "grounded"] += 1
            if reason:
                res = self.validator.reject(reason)
        if not res.ok:
            self._rejected(tally, res, raw if raw is not None else cand)
            return full
        tally.streamed += 1
        if photo is not None:
            self.photo_streamed[photo["id"]] += 1
        # the shard can be full before the stream only when an earlier attempt's requests
        # failed (its later replies wrote what these lines would have)
        if full or kept >= target:
            tally.surplus += 1
            return streamed + 1 >= target
        self.writer.write(triple_record(self.recipe, agent, res.triple, self.backend, self.model,
                                        photo))
        tally.kept += 1
        if photo is not None:
            self.photo_kept[photo["id"]] += 1
        tally.operations[res.operation] += 1
        if self.bar is not None:
            self.bar.update(1)
        return streamed + 1 >= target

    def photo_single_target(self, photo: dict) -> int:
        """Single edits wanted from a photo: ``per_photo`` less its session turns written."""
        return self.settings.photos.per_photo - min(self.settings.photos.per_photo,
                                                    self.photo_s_kept[photo["id"]])

    @staticmethod
    def _photo_input(cand: object, photo: dict) -> bool:
        """Whether a candidate's input is the photo's caption (as stored: ``clean_text``)."""
        return (isinstance(cand, dict) and isinstance(cand.get("input"), str)
                and clean_text(cand["input"]) == clean_text(photo.get("caption") or ""))

    def _ground(self, agent: Agent, triple: dict, photo: dict) -> str | None:
        """The grounding check's rejection reason for a valid triple, or None."""
        op = triple["operation"]
        t = edit_targets(op, triple["input"], triple["output"], things(agent))
        phrases = queried(op, t)
        p = self.settings.photos
        scores = self.grounder.score(photo, phrases) if phrases else {}
        return ground_check(op, t, scores, p.present_min, p.absent_max)

    def _candidate_id(self, agent: Agent, cand: object) -> str | None:
        """The id a candidate's triple would get (``triple_record``), None if it has none."""
        if not isinstance(cand, dict) or not all(isinstance(cand.get(f), str) for f in FIELDS):
            return None
        return content_id(self.recipe.name, agent.name, *(clean_text(cand[f]) for f in FIELDS))

    def offer_session(self, agent: Agent, cand: object, raw: str | None = None,
                      photo: dict | None = None) -> bool:
        """Check one session line turn by turn and write its nodes if it is kept; True once the
        agent's (with ``photo``: that photo's) session turns are full. As ``offer``: every
        line is checked, also after the agent is full (a good one is surplus), and a resumed
        run's replay brings back the nodes the partial shard holds (counted, not written
        again). A session from a photo starts from the photo's caption; its turn-1 edits pass
        the grounding check on the photo."""
        tally = self.tallies[agent.name]
        st = tally.sessions
        if photo is None:
            target, streamed, kept = st.target, st.streamed, st.kept
        else:
            pid = photo["id"]
            target, streamed, kept = (self.photo_sessions, self.photo_s_streamed[pid],
                                      self.photo_s_kept[pid])
        index = st.candidates
        st.candidates += 1
        tally.candidates += 1
        full = streamed >= target
        ground = None
        if photo is not None and self.grounder is not None:
            def ground(triple: dict) -> str | None:
                reason = self._ground(agent, triple, photo)
                self.grounded[reason or "grounded"] += 1
                return reason
        checked = check_session(cand, agent, self.validator, self.settings.sessions,
                                self.recipe.name, index, self.pending,
                                photo_caption=None if photo is None else
                                (photo.get("caption") or ""), ground=ground)
        if ground is not None:  # a written turn 1 passed the check when it was written
            self.grounded["grounded"] += sum(1 for n in checked.nodes
                                             if n["pending"] and n["turn"] == 1)
        if checked.reason is not None:
            st.rejected[checked.reason] += 1
            self._reject_reason(tally, checked.reason, raw if raw is not None else cand)
            return full
        for reason, turn in checked.rejected:
            st.rejected[reason] += 1
            self._reject_reason(tally, reason, json.dumps(turn, ensure_ascii=False))
        st.cut += checked.cut
        if not checked.ok:
            st.dropped += 1
            return full
        room = target - streamed
        if 0 < room < len(checked.nodes):  # the agent's last session: trim it to the target
            top = checked.nodes[:room]  # parents come first: still a tree
            if max(n["turn"] for n in top) >= self.settings.sessions.min_turns:
                st.trimmed += len(checked.nodes) - room
                checked.nodes = top
        n = len(checked.nodes)
        st.streamed += n
        if photo is not None:
            self.photo_s_streamed[photo["id"]] += n
        if not checked.pending and (full or kept >= target):
            st.surplus += 1
            return streamed + n >= target
        self._write_session(agent, checked, photo)
        return streamed + n >= target

    def _write_session(self, agent: Agent, checked: SessionChecked,
                       photo: dict | None = None) -> None:
        tally = self.tallies[agent.name]
        for node in checked.nodes:
            rec = node_record(self.recipe, agent, node, checked.session_id, self.backend,
                              self.model, photo)
            if rec["id"] in self.writer.done:  # written before a resumed run's interruption
                continue
            self.writer.write(rec)
            tally.kept += 1
            tally.sessions.kept += 1
            if photo is not None:
                self.photo_s_kept[photo["id"]] += 1
            tally.operations[rec["operation"]] += 1
            if self.bar is not None:
                self.bar.update(1)
        tally.sessions.add(checked)

    def _rejected(self, tally: AgentTally, res: Checked, raw: object) -> None:
        self._reject_reason(tally, res.reason, raw)

    def _reject_reason(self, tally: AgentTally, reason: str, raw: object) -> None:
        tally.rejected[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(str(raw)[:300])
        update_postfix(self.bar, rejected=sum(self.validator.rejected.values()))

    def stats(self, started: float, requests: dict | None = None,
              earlier_s: float = 0.0) -> dict:
        """The rank's counts for its marker; ``requests`` and time add up every attempt."""
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
            "resumed": self.resumed, "unreplayed": len(self.pending),
            **({"sessions": merge([t.sessions.as_dict() for t in self.tallies.values()
                                   if t.sessions is not None])}
               if self.settings.sessions.share > 0 else {}),
            **({"photos": sum(len(v) for n, v in self.photos.items() if n in self.tallies),
                "grounded": dict(sorted(self.grounded.items()))}
               if self.photos is not None else {}),
            "elapsed_s": round(earlier_s + time.perf_counter() - started, 3),
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # ------------------------------------------------------------------ template
    def run_template(self) -> dict:
        started = time.perf_counter()
        if self.photos is not None:
            return self._template_photos(started)
        for agent in self.agents:
            tally = self.tallies[agent.name]
            if tally.sessions is not None and tally.sessions.target:
                sessions = SessionComposer(agent, self.settings.seed,
                                           self.settings.sessions).candidates()
                for _ in range(max(50, tally.sessions.target * TEMPLATE_ATTEMPTS)):
                    if self.offer_session(agent, next(sessions)):
                        break
                if not tally.single_target():
                    continue
            stream = TemplateComposer(agent, self.settings.seed).candidates()
            for _ in range(max(200, tally.single_target() * TEMPLATE_ATTEMPTS)):
                if self.offer(agent, next(stream)):
                    break
        return self.stats(started)

    def _template_photos(self, started: float) -> dict:
        """Per photo, candidates editing its caption until ``per_photo`` are kept (or the
        caption gives nothing more to edit)."""
        n = self.settings.photos.per_photo
        for agent in self.agents:
            for photo in self.photos.get(agent.name, []):
                caption = clean_text(photo.get("caption") or "")
                if self.photo_sessions:
                    sessions = SessionComposer(agent, self.settings.seed,
                                               self.settings.sessions, (photo["id"], caption))
                    for _, cand in zip(range(max(20, self.photo_sessions * TEMPLATE_ATTEMPTS)),
                                       sessions.candidates(), strict=False):
                        if self.offer_session(agent, cand, photo=photo):
                            break
                    if not self.photo_single_target(photo):
                        continue
                stream = PhotoComposer(agent, self.settings.seed, caption,
                                       photo["id"]).candidates()
                for _, cand in zip(range(max(50, n * TEMPLATE_ATTEMPTS)), stream, strict=False):
                    if self.offer(agent, cand, photo=photo):
                        break
        return self.stats(started)

    # ------------------------------------------------------------------ openai
    def run_openai(self) -> dict:
        started = time.perf_counter()
        show_retry = retry_postfix(self.bar)

        def on_retry(event) -> None:
            show_retry(event)
            self._save_attempt(backend, started)

        backend = ChatClient(self.settings, RequestCache(self.build.cache_dir / "captions"),
                             section="captions", offline_hint=OFFLINE_HINT, on_retry=on_retry)
        self.model = backend.model
        try:
            asyncio.run(self._openai(backend, started))
        finally:  # also when stopped (dead endpoint, Ctrl-C): this attempt's requests count
            self._save_attempt(backend, started)
        earlier = self.log.earlier if self.log is not None else []
        requests = sum_request_stats([*(a.get("requests") for a in earlier),
                                      backend.stats.as_dict()])
        requests["attempts"] = len(earlier) + 1
        stats = self.stats(started, requests, sum(a.get("elapsed_s", 0) for a in earlier))
        if backend.stats.failed and stats["short"]:
            errors = backend.stats.errors
            raise StageFailed(
                f"captions: {backend.stats.failed} request(s) to {backend.endpoint} failed after "
                f"{self.settings.max_retries} retries (last error: {errors[-1] if errors else '?'})"
                f" and agents {sorted(stats['short'])} are short of their counts; nothing lost; "
                "run the same command again to resume (answers already received are reused "
                "from the cache)"
            )
        return stats

    def _save_attempt(self, backend: ChatClient, started: float) -> None:
        """Record this attempt's request stats beside the partial shard when they changed."""
        st = backend.stats
        now = (st.sent, st.retries, st.failed, len(self.writer.records))
        if self.log is not None and now != self._saved:
            self._saved = now
            self.log.save(st.as_dict(), time.perf_counter() - started, len(self.writer.records))

    async def _openai(self, backend: ChatClient, started: float) -> None:
        """Rounds per agent: ask for what is missing, take every line of every reply in
        sample order. Sample numbers and rounds depend only on the replies, never on what the
        partial shard held, so a resumed run asks the same requests (from the cache)."""
        s = self.settings
        rounds = s.max_rounds or AUTO_ROUNDS
        async with backend:
            if self.photos is not None:
                await self._openai_photos(backend, started, rounds)
                return
            for agent in self.agents:
                tally = self.tallies[agent.name]
                if tally.sessions is not None and tally.sessions.target:
                    await self._openai_sessions(backend, started, agent, rounds)
                sample = 0
                for _ in range(rounds):
                    need = tally.single_target() - tally.streamed
                    if need <= 0:
                        break
                    idx = list(range(sample, sample + math.ceil(need / s.per_request)))
                    sample += len(idx)
                    tally.requests += len(idx)
                    asks = [(build_messages(self.recipe, agent, s.per_request, i, s.seed), i)
                            for i in idx]
                    async for reply in backend.complete_in_order(asks):
                        if reply is not None:
                            for line, cand in zip_lines(reply["content"]):
                                self.offer(agent, cand, line)
                        self._save_attempt(backend, started)


    async def _openai_sessions(self, backend: ChatClient, started: float, agent: Agent,
                               rounds: int, photo: dict | None = None) -> None:
        """An agent's (or a photo's) session rounds, before its single edits: ask for sessions
        until the session turns the stream gave reach the session target; sample numbers count
        session requests on their own (their prompt differs from the single edits')."""
        s, ss = self.settings, self.settings.sessions
        tally = self.tallies[agent.name]
        st = tally.sessions
        caption = None if photo is None else clean_text(photo.get("caption") or "")
        target = st.target if photo is None else self.photo_sessions
        per = expected_nodes(ss)
        k = max(1, round(min(target, s.per_request) / per))  # sessions per request
        sample = 0
        for _ in range(rounds):
            need = target - (st.streamed if photo is None else self.photo_s_streamed[photo["id"]])
            if need <= 0:
                break
            idx = list(range(sample, sample + math.ceil(need / (k * per))))
            sample += len(idx)
            st.requests += len(idx)
            tally.requests += len(idx)
            asks = [(build_session_messages(self.recipe, agent, k, i, s.seed, ss.turns,
                                            ss.min_turns, ss.branches, ss.branch_share > 0,
                                            photo_caption=caption), i)
                    for i in idx]
            async for reply in backend.complete_in_order(asks):
                if reply is not None:
                    for line, cand in zip_lines(reply["content"]):
                        self.offer_session(agent, cand, line, photo=photo)
                self._save_attempt(backend, started)

    async def _openai_photos(self, backend: ChatClient, started: float, rounds: int) -> None:
        """Rounds per photo, as per agent without photos: the photo's caption is the input
        caption every requested triple edits (``build_messages(photo_caption=...)``)."""
        s = self.settings
        for agent in self.agents:
            for photo in self.photos.get(agent.name, []):
                caption = clean_text(photo.get("caption") or "")
                if self.photo_sessions:
                    await self._openai_sessions(backend, started, agent, rounds, photo)
                    if not self.photo_single_target(photo):
                        continue
                target = self.photo_single_target(photo)
                sample = 0
                for _ in range(rounds):
                    need = target - self.photo_streamed[photo["id"]]
                    if need <= 0:
                        break
                    idx = list(range(sample, sample + math.ceil(need / s.per_request)))
                    sample += len(idx)
                    self.tallies[agent.name].requests += len(idx)
                    asks = [(build_messages(self.recipe, agent, min(target, s.per_request), i,
                                            s.seed, photo_caption=caption), i) for i in idx]
                    async for reply in backend.complete_in_order(asks):
                        if reply is not None:
                            for line, cand in zip_lines(reply["content"]):
                                self.offer(agent, cand, line, photo=photo)
                        self._save_attempt(backend, started)


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


def attempts_path(partial: Path) -> Path:
    """rNNNNN.jsonl.partial.stats.json: what each attempt at a partial shard paid for."""
    return partial.with_name(partial.name + ".stats.json")


class AttemptLog:
    """Request stats of earlier attempts at one rank's partial shard, and the current one's.

    A killed run cannot say what it paid for at the end, so each attempt rewrites its entry
    (atomically) after every paid reply; the resume adds them up. The file belongs to the
    partial shard: written under the same signature and never holding more records than the
    partial now does, else (a new signature, --force, a deleted partial) it is ignored.
    """

    def __init__(self, partial: Path, signature: str, records: int, fresh: bool):
        self.path = attempts_path(partial)
        self.signature = signature
        self.earlier: list[dict] = []
        if fresh:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return
        if (isinstance(data, dict) and data.get("signature") == signature
                and int(data.get("records", 0)) <= records):
            self.earlier = [a for a in data.get("attempts", []) if isinstance(a, dict)]

    def save(self, requests: dict, elapsed_s: float, records: int) -> None:
        write_json(self.path, {
            "signature": self.signature, "records": records,
            "attempts": [*self.earlier, {"requests": requests,
                                         "elapsed_s": round(elapsed_s, 3)}],
        })


def check_share(stats: dict, settings: CaptionsSettings, rank: int) -> None:
    """StageFailed when the rank kept nothing, or less than ``min_share`` of its target."""
    target, kept = stats["target"], stats["kept"]
    if not target or (kept and kept >= settings.min_share * target):
        return
    rejected = stats["rejected"]
    top = sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))
    why = (f"{sum(rejected.values())} line(s) rejected (" + ", ".join(
        f"{k}={v}" for k, v in top[:5]) + ")") if rejected else "no line came back"
    examples = [stats["rejected_examples"].get(k) for k, _ in top]
    example = next((ex[0] for ex in examples if ex), None)
    req = stats.get("requests") or {}
    lines = [
        f"captions rank {rank} kept {kept} of {target} triples, under captions.min_share="
        f"{settings.min_share:g} of the target: {why}",
        *([f"  e.g. {example[:160]!r}"] if example else []),
        *([f"  requests: {req.get('sent', 0)} sent, {req.get('failed', 0)} failed"]
          if req else []),
        "  no completion marker written; nothing lost (the partial shard and the cached replies "
        "stay). A re-run replays the same replies: change what is asked (captions.model, the "
        "recipe's agents or examples), raise captions.max_rounds to ask for more, or lower "
        "captions.min_share to accept fewer",
    ]
    raise StageFailed("\n".join(lines))


def run_captions(build: Build, rank: int = 0, world_size: int = 1, *,
                 backend: str | None = None, force: bool = False,
                 overrides: list[str] | tuple[str, ...] = (),
                 show_progress: bool = True, photos: dict[str, dict] | None = None,
                 detector=None) -> StageResult:
    """Write this rank's caption triples (resumable) and refresh reports/captions.json.

    In a build with photos (the sources stage; ``photos`` by id replaces them, for tests) the
    triples edit the photos' captions; ``detector`` replaces the grounding check's detector
    (an :class:`dsbuild.models.owl.OwlDetector`)."""
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
        log = AttemptLog(writer.partial, build.signature("captions"), len(writer.records),
                         fresh=force) if chosen == "openai" else None
        run = CaptionsRun(build, agents, chosen, writer, log, show_progress=show_progress,
                          photos=photo_assignment(build, photos), detector=detector)
        try:
            stats = run.run_template() if chosen == "template" else run.run_openai()
        finally:
            run.close()
        check_share(stats, s, rank)
        return stats

    result = build.run_stage("captions", rank, world_size, work, force=force)
    # the shard is committed (or was already): the per-attempt stats are in its marker
    attempts_path(build.output_dir("captions") / (shard_name(rank) + ".partial")).unlink(
        missing_ok=True)
    return result
