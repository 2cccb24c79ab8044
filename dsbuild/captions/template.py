"""The offline ``template`` backend: compose triples from a recipe agent's vocabulary.

Captions are built from the vocabulary (subjects × styles × colours × materials × features /
objects × fixtures) and one operation (add, remove, change an attribute, replace) is applied,
with varied instruction phrasing. A seeded RNG per (seed, agent) makes the output
deterministic and independent of how agents are sharded over ranks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from dsbuild.core.config import Agent
from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.text import article, bare, with_article


def join_items(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


class TemplateComposer:
    """Endless stream of candidate triples for one agent (validated by the caller)."""

    def __init__(self, agent: Agent, seed: int, stream: str | None = None):
        """``stream`` names a second, independent stream of the same agent and seed (the roots
        of its sessions: ``"session"``); None is the single-edit stream."""
        self.agent = agent
        self.voc = agent.vocabulary
        self.rng = random.Random(content_id("template", seed, agent.name)
                                 if stream is None else
                                 content_id("template", seed, agent.name, stream))

    # ------------------------------------------------------------------ small helpers
    def pick(self, words: list[str], *avoid: str) -> str | None:
        pool = [w for w in words if w not in avoid]
        return self.rng.choice(pool) if pool else None

    def name(self, thing: str) -> str:
        """The thing, or sometimes a synonym of it from the vocabulary (for edit variety)."""
        syns = self.voc.synonyms.get(thing)
        if syns and self.rng.random() < 0.3:
            return self.rng.choice(syns)
        return thing

    def materials(self, thing: str) -> list[str]:
        """Materials that suit a thing (``vocabulary.materials_for``), else all materials."""
        return list(self.voc.materials_for.get(thing, self.voc.materials))

    def phrase(self, templates: list[str], **kw: str) -> str:
        return self.rng.choice(templates).format(**kw)

    # draws in a row that make nothing before the vocabulary is declared too thin
    MAX_EMPTY_DRAWS = 1000

    def candidates(self) -> Iterator[dict]:
        ops = list(self.agent.operations)
        make = self._object if self.agent.level == "object" else self._room
        empty = 0
        while True:
            op = self.rng.choice(ops)
            cand = make(op)
            if cand is None:
                empty += 1
                if empty >= self.MAX_EMPTY_DRAWS:
                    raise DsbuildError(
                        f"agent '{self.agent.name}': the template backend cannot compose a "
                        f"triple from its vocabulary for operations {', '.join(ops)}; a "
                        f"{self.agent.level} agent needs "
                        + ("features (add/remove), 2+ colours, materials or styles "
                           "(change), 2+ subjects (replace)"
                           if self.agent.level == "object" else
                           "3+ objects, and 2+ colours or materials (change)")
                        + " in its vocabulary")
                continue
            empty = 0
            cand["operation"] = op
            yield cand

    # ------------------------------------------------------------------ object level
    def _object_np(self, subject: str, attrs: dict[str, str | None]) -> str:
        words = [attrs.get("style"), attrs.get("colour"), attrs.get("material"), subject]
        return with_article(" ".join(w for w in words if w))

    def _object(self, op: str) -> dict | None:
        v, rng = self.voc, self.rng
        subject = rng.choice(v.subjects)
        mats = self.materials(subject)
        attrs = {
            "style": self.pick(v.styles) if v.styles and rng.random() < 0.7 else None,
            "colour": self.pick(v.colours) if v.colours and rng.random() < 0.8 else None,
            "material": self.pick(mats) if mats and rng.random() < 0.7 else None,
        }
        pools = {"style": v.styles, "colour": v.colours, "material": mats}
        want = min(2, sum(1 for w in pools.values() if w))
        while sum(1 for a in attrs.values() if a) < want:  # short captions make huge diffs
            kind = rng.choice([k for k, w in pools.items() if w and not attrs[k]])
            attrs[kind] = self.pick(pools[kind])
        feats = [bare(f) for f in v.features]
        extra = self.pick(feats) if feats and rng.random() < 0.35 else None
        if op == "change":
            kinds = [k for k, words in pools.items() if len(words) >= 2]
            if not kinds:
                return None
            kind = rng.choice(kinds)
            words = pools[kind]
            old = attrs[kind] or self.pick(words)
            new = self.pick(words, old)
            attrs_in, attrs_out = dict(attrs, **{kind: old}), dict(attrs, **{kind: new})
            tail = f" with {with_article(extra)}" if extra else ""
            inp = self._object_np(subject, attrs_in) + tail
            out = self._object_np(subject, attrs_out) + tail
            s = self.name(subject)
            edit = self.phrase({
                "colour": ["make the {s} {new}", "change the colour of the {s} to {new}",
                           "turn the {s} {new}", "paint the {s} {new}", "make it {new}"],
                "material": ["make the {s} out of {new}", "change the {old} to {new}",
                             "make the {s} {new} instead of {old}", "use {new} for the {s}"],
                "style": ["make the {s} {new}", "give the {s} {a} {new} look",
                          "restyle the {s} in {a} {new} style", "make it look {new}"],
            }[kind], s=s, new=new, old=old, a=article(new))
            return {"input": inp, "edit": edit, "output": out}
        if op in ("add", "remove"):
            if not feats:
                return None
            feat = self.pick(feats, extra or "")
            base = self._object_np(subject, attrs)
            keep = f" with {with_article(extra)}" if extra and extra != feat else ""
            f_np, s = with_article(feat), self.name(subject)
            if op == "add":
                joiner = " and no " if keep else " without "
                inp = base + keep + joiner + (feat if keep else f_np)
                out = base + (keep + " and " if keep else " with ") + f_np
                edit = self.phrase(["add {f}", "add {f} to the {s}", "give the {s} {f}",
                                    "put {f} on the {s}"], f=f_np, s=s)
            else:
                inp = base + (keep + " and " if keep else " with ") + f_np
                if keep or rng.random() < 0.5:
                    out = base + keep
                else:
                    out = base + " without " + feat
                the = "the " + feat
                edit = self.phrase(["remove {t}", "remove {t} from the {s}", "take off {t}",
                                    "take away {t}", "get rid of {t}"], t=the, s=s)
            return {"input": inp, "edit": edit, "output": out}
        if op == "replace":
            new = self.pick(v.subjects, subject)
            if new is None:
                return None
            tail = f" with {with_article(extra)}" if extra else ""
            inp = self._object_np(subject, attrs) + tail
            out = self._object_np(new, attrs) + tail
            edit = self.phrase(["replace the {s} with {n}", "swap the {s} for {n}",
                                "turn the {s} into {n}", "replace it with {n}"],
                               s=self.name(subject), n=with_article(new))
            return {"input": inp, "edit": edit, "output": out}
        return None

    # ------------------------------------------------------------------ room level
    def _thing(self, obj: str, rich: bool = True) -> str:
        v, rng = self.voc, self.rng
        words = []
        if rich and v.colours and rng.random() < 0.5:
            words.append(rng.choice(v.colours))
        mats = self.materials(obj)
        if rich and mats and rng.random() < 0.4:
            words.append(rng.choice(mats))
        return " ".join([*words, obj])

    def _room(self, op: str) -> dict | None:
        v, rng = self.voc, self.rng
        room = rng.choice(v.subjects)
        style = self.pick(v.styles) if v.styles and rng.random() < 0.8 else None
        objs = [bare(o) for o in v.objects]
        if len(objs) < 3:
            return None
        n_items = rng.choice([2, 2, 3])
        chosen = rng.sample(objs, n_items + 1)
        present, spare = chosen[:n_items], chosen[n_items]
        things = [self._thing(o) for o in present]
        fixture = self.pick(v.fixtures) if v.fixtures and rng.random() < 0.4 else None

        def caption(items: list[str], style_word: str | None = style) -> str:
            h = with_article(" ".join(w for w in (style_word, room) if w))
            lst = ([with_article(fixture)] if fixture else []) + items
            return f"{h} with {join_items(lst)}"

        items = [with_article(t) for t in things]
        if op == "add":
            new = self._thing(spare, rich=rng.random() < 0.5)
            inp = caption(items + [f"no {spare}"])
            out = caption(items + [with_article(new)])
            edit = self.phrase(["add {n}", "add {n} to the room", "put {n} in the {r}",
                                "place {n} in the room"], n=with_article(new), r=room)
            return {"input": inp, "edit": edit, "output": out}
        if op == "remove":
            k = 1 if n_items == 3 else rng.choice([0, 1])
            gone = present[k]
            inp = caption(items)
            out = caption(items[:k] + items[k + 1:])
            edit = self.phrase(["remove the {o}", "take away the {o}", "get rid of the {o}",
                                "remove the {o} from the {r}", "take out the {o}"],
                               o=self.name(gone), r=room)
            return {"input": inp, "edit": edit, "output": out}
        if op == "replace":
            k = rng.randrange(n_items)
            new = self._thing(spare, rich=rng.random() < 0.4)
            inp = caption(items)
            out = caption(items[:k] + [with_article(new)] + items[k + 1:])
            edit = self.phrase(["replace the {o} with {n}", "swap the {o} for {n}",
                                "exchange the {o} for {n}"],
                               o=self.name(present[k]), n=with_article(new))
            return {"input": inp, "edit": edit, "output": out}
        if op == "change":
            kinds = ["colour", "material"] + (["style"] if len(v.styles) >= 2 else [])
            kind = rng.choice(kinds)
            if kind == "style":
                old = style or self.pick(v.styles)
                new = self.pick(v.styles, old)
                inp, out = caption(items, old), caption(items, new)
                edit = self.phrase(["make the room {n}", "redecorate the {r} in {n} style",
                                    "make the {r} {n}", "restyle the room as {n}",
                                    "give the room {a} {n} look"], n=new, r=room,
                                   a=article(new))
                return {"input": inp, "edit": edit, "output": out}
            k = rng.randrange(n_items)
            obj = present[k]
            words = v.colours if kind == "colour" else self.materials(obj)
            if len(words) < 2:
                return None
            old = self.pick(words)
            new = self.pick(words, old)
            mats = self.materials(obj)
            other = [self.pick(mats)] if kind == "colour" and mats and rng.random() < 0.3 else []
            t_in = " ".join([old, *other, obj]) if kind == "colour" else f"{old} {obj}"
            t_out = " ".join([new, *other, obj]) if kind == "colour" else f"{new} {obj}"
            inp = caption(items[:k] + [with_article(t_in)] + items[k + 1:])
            out = caption(items[:k] + [with_article(t_out)] + items[k + 1:])
            o = self.name(obj)
            templates = (["make the {o} {n}", "change the colour of the {o} to {n}",
                          "paint the {o} {n}", "turn the {o} {n}"] if kind == "colour" else
                         ["make the {o} out of {n}", "change the {old} {o} to {n}",
                          "use {n} for the {o}"])
            edit = self.phrase(templates, o=o, n=new, old=old)
            return {"input": inp, "edit": edit, "output": out}
        return None
