"""Leak-free train/test split: rows grouped by triple and by caption, groups split by seed.

Two rows land in one group when they share a triple, a multi-turn session or any caption
(input or output, compared without case, punctuation, spacing or a/an), transitively. Whole groups go to one split, so no
caption is ever in both. Groups are ordered by a seeded hash and taken into test until its
share of rows is closest to ``test_ratio``; the assignment depends only on the rows and the seed.
"""

from __future__ import annotations

from collections.abc import Iterable

from dsbuild.core.hashing import content_id
from dsbuild.core.text import normalise

SPLITS = ("train", "test")


def caption_key(text: str) -> str:
    """A caption as the split compares it: without case, punctuation, spacing or a/an, so
    "A sofa, a rug." and "a sofa a rug" are one caption and land in one split."""
    return normalise(text)


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def row_nodes(triple_id: str, captions: Iterable[str], session: str | None = None
              ) -> list[str]:
    """A row's group nodes: its triple, its captions and, for a turn of a multi-turn session,
    the session (every run of a session, and its root caption, on one side)."""
    return ([f"t:{triple_id}"] + [f"c:{caption_key(c)}" for c in captions if c]
            + ([f"s:{session}"] if session else []))


def group_rows(rows: dict[str, list[str]]) -> dict[str, list[str]]:
    """Connected groups of rows: ``rows`` maps row id -> its nodes (triple, captions)."""
    uf = _UnionFind()
    for nodes in rows.values():
        for n in nodes[1:]:
            uf.union(nodes[0], n)
        uf.find(nodes[0])
    groups: dict[str, list[str]] = {}
    for rid, nodes in rows.items():
        groups.setdefault(uf.find(nodes[0]), []).append(rid)
    return groups


def assign_groups(groups: dict[str, list[str]], test_ratio: float, seed: int) -> dict[str, str]:
    """Group root -> split; test holds whole groups whose row share is closest to test_ratio."""
    total = sum(len(v) for v in groups.values())
    target = test_ratio * total
    order = sorted(groups, key=lambda g: (content_id("split", seed, g), g))
    out: dict[str, str] = {}
    test_n = 0
    for i, g in enumerate(order):
        size = len(groups[g])
        last_for_train = i == len(order) - 1 and all(s == "test" for s in out.values())
        closer = abs(test_n + size - target) < abs(test_n - target)
        if test_ratio > 0 and not last_for_train and closer:
            out[g] = "test"
            test_n += size
        else:
            out[g] = "train"
    if test_ratio > 0 and test_n == 0 and len(order) > 1:
        # no group brought test nearer its target (every group is big): the smallest one
        # (seeded order breaks ties) goes to test, so test is never empty
        smallest = min(order, key=lambda g: len(groups[g]))
        out[smallest] = "test"
    return out


def split_rows(rows: dict[str, list[str]], test_ratio: float, seed: int
               ) -> tuple[dict[str, str], dict[str, str]]:
    """Row id -> split, and caption node -> split (to place rows that follow a caption)."""
    groups = group_rows(rows)
    by_group = assign_groups(groups, test_ratio, seed)
    row_split: dict[str, str] = {}
    node_split: dict[str, str] = {}
    for g, members in groups.items():
        for rid in members:
            row_split[rid] = by_group[g]
            for n in rows[rid]:
                node_split[n] = by_group[g]
    return row_split, node_split
