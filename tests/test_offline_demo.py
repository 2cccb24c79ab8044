"""The README's offline demo gives what the previous main gave: the same triple, pair and score
ids, pixel-equal images and the same export rows.

``fixtures/offline_demo.json`` was made with main at acb14b8 (before the house was cut by
layer) by ``python tests/snapshot.py BUILD OUT`` on ``dsbuild run recipes/interior-design.yaml
--offline`` with one torch thread (``torch.set_num_threads(1)``): pixels depend on how many
threads split the sums, so the test runs with one too and holds on any core count. Export columns renamed since are mapped below; new columns are listed (and
checked to be filled).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from snapshot import snapshot

FIXTURE = Path(__file__).parent / "fixtures" / "offline_demo.json"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "interior-design.yaml"
RENAMED = {"p2p_params": "params"}  # old export column -> its name now
# columns the previous main did not write -> their value on the demo
ADDED = {"generator": "p2p", "blend_words": None, "equalizer": None}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
    return a == b


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_torch_thread):
    from dsbuild.cli.run import run_pipeline

    out = tmp_path_factory.mktemp("demo") / "demo"
    run_pipeline(RECIPE, out, offline=True, echo=lambda s: None)
    return snapshot(out)


def test_ids_and_pixels_equal_the_previous_main(demo):
    want = json.loads(FIXTURE.read_text())
    assert demo["triples"] == want["triples"]
    assert sorted(demo["pairs"]) == sorted(want["pairs"])
    for pid, images in want["pairs"].items():
        assert demo["pairs"][pid] == images, pid  # decoded pixels' hashes
    assert [tuple(s) for s in demo["scores"]] == [tuple(s) for s in want["scores"]]


def test_export_rows_equal_the_previous_main(demo):
    want = json.loads(FIXTURE.read_text())["export"]
    assert {k: len(v) for k, v in demo["export"].items()} == {k: len(v) for k, v in want.items()}
    for split, rows in want.items():
        got = {r["pair_id"]: r for r in demo["export"][split]}
        for old in rows:
            new = got[old["pair_id"]]
            for col, value in old.items():
                name = RENAMED.get(col, col)
                assert name in new, f"column {col} ({name}) is missing"
                if col in RENAMED and isinstance(value, str):  # JSON text: compare parsed
                    assert json.loads(new[name]) == json.loads(value), (split, col)
                else:
                    assert _same(new[name], value), (split, old["pair_id"], col, new[name], value)
            extra = set(new) - {RENAMED.get(c, c) for c in old}
            assert extra <= set(ADDED), f"unexpected new columns {extra - set(ADDED)}"
            for col, value in ADDED.items():
                assert new[col] == value, (col, new[col])


# the completion-marker folders of that build (.done/<stage>/<signature>)
PREVIOUS_SIGNATURES = {"captions": "baf5242b5e19", "generate": "d9fe1d834b89",
                       "filter": "df558a67fa31", "verify": "eeae05c7c39e",
                       "augment": "da76c86ec331", "diversity": "49fb0cae0f2f"}
# export's ("d3d02d804b70" there) also signs the optional stages it read when they were
# complete, which this bare dsbuild.yaml has no markers for


def test_a_build_of_the_previous_main_keeps_its_markers(tmp_path):
    """The demo build's dsbuild.yaml as acb14b8 froze it signs every stage as it did then, so
    an existing build stays done and nothing reruns."""
    from dsbuild.core.build import Build

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "dsbuild.yaml").write_text(
        (FIXTURE.parent / "offline_demo.dsbuild.yaml").read_text())
    b = Build.open(tmp_path / "b")
    assert {s: b.signature(s) for s in PREVIOUS_SIGNATURES} == PREVIOUS_SIGNATURES
