"""The README's offline demo gives what the previous main gave: the same triple, pair and score
ids, the same images and the same export rows.

``fixtures/offline_demo.json`` was made with main at acb14b8 (before the house was cut by
layer) by ``python tests/snapshot.py BUILD OUT`` on ``dsbuild run recipes/interior-design.yaml
--offline`` with one torch thread (``torch.set_num_threads(1)``). Images are held by the hash
of their decoded pixels and, where a hash differs, by an 8x8 block-mean thumbnail: float sums
round differently on another CPU (the fixture's AVX-512 machine against an AVX2 one) or thread
count, which moves single pixels by a level or two but not what the picture shows; a change in
dsbuild's sampling moves the thumbnail far more (see ``test_the_thumbnail_check_can_fail``).
Export columns renamed since are mapped below; new columns are listed (and checked to be
filled).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from snapshot import snapshot

FIXTURE = Path(__file__).parent / "fixtures" / "offline_demo.json"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "interior-design.yaml"
RENAMED = {"p2p_params": "params"}  # old export column -> its name now
# columns the previous main did not write -> their value on the demo
ADDED = {"generator": "p2p", "blend_words": None, "equalizer": None,
         # photo provenance (issue 27): every export has the columns; None in a synthetic one
         "photo_id": None, "license": None, "source": None, "attribution": None,
         "reconstruction_psnr": None,
         # multi-turn sessions (issue 28): None on a single edit
         "session_id": None, "session_run": None, "turn": None, "node_id": None,
         "parent_id": None, "source_image": None,
         # the judge and re-captioning (issue 29): None where they did not run
         "judge_score": None, "edit_prompt_recaptioned": None}
# added columns whose value is another column's (issue 29: the captions stage's instruction)
ADDED_AS = {"edit_prompt_generated": "original_edit"}


# largest block-mean difference (0-255) taken as float noise, not a change of picture
THUMB_TOLERANCE = 2.0


def _same_image(got_hash: str, want_hash: str, got: dict, want: dict) -> bool:
    if got_hash == want_hash:
        return True
    a, b = got["thumbs"][got_hash], want["thumbs"][want_hash]
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= THUMB_TOLERANCE


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
    return a == b


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, one_torch_thread):
    """The demo build and the lines ``dsbuild run`` printed."""
    from dsbuild.cli.run import run_pipeline

    out = tmp_path_factory.mktemp("demo") / "demo"
    lines: list[str] = []
    run_pipeline(RECIPE, out, offline=True, echo=lines.append)
    return out, lines


@pytest.fixture(scope="module")
def demo(demo_run):
    return snapshot(demo_run[0])


def test_ids_and_pixels_equal_the_previous_main(demo):
    want = json.loads(FIXTURE.read_text())
    assert demo["triples"] == want["triples"]
    assert sorted(demo["pairs"]) == sorted(want["pairs"])
    for pid, images in want["pairs"].items():
        assert demo["pairs"][pid].keys() == images.keys(), pid
        for key, h in images.items():
            assert _same_image(demo["pairs"][pid][key], h, demo, want), (pid, key)
    assert [tuple(s) for s in demo["scores"]] == [tuple(s) for s in want["scores"]]


def test_export_rows_equal_the_previous_main(demo):
    snapshot_want = json.loads(FIXTURE.read_text())
    want, want_thumbs = snapshot_want["export"], snapshot_want["thumbs"]
    assert {k: len(v) for k, v in demo["export"].items()} == {k: len(v) for k, v in want.items()}
    for split, rows in want.items():
        got = {r["pair_id"]: r for r in demo["export"][split]}
        for old in rows:
            new = got[old["pair_id"]]
            for col, value in old.items():
                name = RENAMED.get(col, col)
                assert name in new, f"column {col} ({name}) is missing"
                if isinstance(value, str) and value in want_thumbs:  # an image's pixel hash
                    assert _same_image(new[name], value, demo, snapshot_want), (split, col)
                elif col in RENAMED and isinstance(value, str):  # JSON text: compare parsed
                    assert json.loads(new[name]) == json.loads(value), (split, col)
                else:
                    assert _same(new[name], value), (split, old["pair_id"], col, new[name], value)
            extra = set(new) - {RENAMED.get(c, c) for c in old}
            assert extra <= set(ADDED) | set(ADDED_AS), \
                f"unexpected new columns {extra - set(ADDED) - set(ADDED_AS)}"
            for col, value in ADDED.items():
                assert new[col] == value, (col, new[col])
            for col, same in ADDED_AS.items():
                assert new[col] == new[same], (col, new[col], new[same])


def test_the_thumbnail_check_can_fail(demo):
    """Any two of the demo's different source images are told apart: the tolerance is far
    below what a change of picture moves."""
    want = json.loads(FIXTURE.read_text())
    sources = sorted({images["input"] for images in want["pairs"].values()})
    assert len(sources) > 1
    for a, b in zip(sources, sources[1:], strict=False):
        assert not _same_image(a, b, want, want), (a, b)


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


# --- a quiet first run (issue 25): captions cut, library messages, progress bars -----------


def test_the_demo_says_in_one_line_how_many_captions_were_cut(demo_run):
    """The tiny model's tokenizer reads one token per character, so the demo cuts captions:
    one line says how many (the count of reports/generate.json and the markers), no list."""
    from dsbuild.core.build import Build
    from dsbuild.core.quiet import CUT_STAT, cut_line, stage_cut

    out, lines = demo_run
    report = json.loads((out / "reports" / "generate.json").read_text())
    n = report[CUT_STAT]
    assert n > 0 and report["token_limit"] == 77
    assert stage_cut(Build.open(out).markers("generate")) == (n, 77)
    said = [line for line in lines if "tokens were cut" in line or "token was cut" in line]
    assert [s.strip() for s in said] == [cut_line(n)], lines
    assert cut_line(n) == f"{n} captions longer than 77 tokens were cut: see docs/captions.md"


def test_count_cut_counts_captions_over_the_limit():
    from dsbuild.core.quiet import count_cut, cut_line
    from dsbuild.models.sd import char_tokenizer

    tok = char_tokenizer()  # one token per character, start and end tokens around them
    assert count_cut(tok, ["a" * 75, "a" * 76, "b" * 300, "short"]) == 2
    assert cut_line(0) is None and cut_line(1).startswith("1 caption longer than 77 tokens was")


def _capture(logger_name: str):
    """A handler on ``logger_name`` recording what reaches it (after dsbuild's filters)."""
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    h = Keep()
    logging.getLogger(logger_name).addHandler(h)
    return h


def test_each_hidden_message_is_dropped_and_its_neighbours_are_not():
    """Every entry hides its own message from its own logger, and only that."""
    import logging

    from dsbuild.core import quiet

    cases = [  # (logger, hidden message, a message beside it that must still show)
        ("diffusers.models.modeling_utils",
         "There are modules in AutoencoderKL that should be kept in float32: []. Casting "
         "directly with `to()` can lead to inconsistent results",
         "There are modules in AutoencoderKL that should be kept in float32: ['quant_conv']."),
        ("transformers.tokenization_utils_base",
         "Token indices sequence length is longer than the specified maximum sequence length "
         "for this model (79 > 77). Running this sequence through the model will result in "
         "indexing errors", "Some other tokenizer warning"),
        ("ray._private.authentication.authentication_token_setup",
         "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to "
         "opt out.", "Token authentication is disabled for this Ray cluster. Anyone with "
         "network access to the cluster can run arbitrary code"),
        ("fiftyone.core.odm.database", quiet.OLDEST_MONGODB_NOTICE + " (6.0.5)",
         "another database warning"),
    ]
    assert {c[0] for c in cases} | {"diffusers.pipelines.*"} == {h.logger for h in quiet.HIDDEN}
    quiet.install()
    for name, hidden, shown in cases:
        seen = _capture(name)
        try:
            log = logging.getLogger(name)
            log.warning(hidden)
            log.warning(shown)
        finally:
            log.removeHandler(seen)
        assert seen.seen == [shown], (name, seen.seen)


def test_diffusers_truncation_warning_is_hidden_and_counted_instead():
    """The real P2P sampler on the tiny pipeline: diffusers does log the truncation (a handler
    added after the filters sees it), the handlers the filters guard do not; the sampler
    counts the cut caption instead."""
    import logging

    from dsbuild.core import quiet
    from dsbuild.generate.generators.p2p.sampler import P2PGenerator
    from dsbuild.models import load_sd_pipeline

    gen = P2PGenerator(load_sd_pipeline("tiny", quiet=True))
    guarded = _capture("diffusers")
    quiet.install()  # the filter now guards every handler of diffusers, ``guarded`` too
    raw = _capture("diffusers")  # added after install: unguarded, sees what diffusers logs
    try:
        gen.encode(["a sunlit living room with " + "a very long caption " * 5, "a short one"])
    finally:
        logging.getLogger("diffusers").removeHandler(guarded)
        logging.getLogger("diffusers").removeHandler(raw)
    assert any("truncated because CLIP" in m for m in raw.seen), raw.seen
    assert not any("truncated because CLIP" in m for m in guarded.seen), guarded.seen
    assert gen.cut == 1 and gen.encoded == 2


class _Stderr:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s):
        return len(s)

    def flush(self):
        pass


@pytest.mark.parametrize("no_progress, ci, tty, shown", [
    (None, None, True, True),      # a terminal: bars
    (None, None, False, False),    # a file or a pipe: none
    (None, "true", True, False),   # CI: none, even on a pseudo-terminal
    (None, "0", True, True),       # CI=0 / false is no CI
    ("1", None, True, False),      # DSBUILD_NO_PROGRESS=1: never
    ("0", None, False, True),      # DSBUILD_NO_PROGRESS=0: always
    ("0", "true", False, True),
])
def test_progress_bars_show_only_where_someone_watches(monkeypatch, no_progress, ci, tty, shown):
    import sys

    from dsbuild.core import progress

    for var, value in (("DSBUILD_NO_PROGRESS", no_progress), ("CI", ci)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    monkeypatch.setattr(sys, "stderr", _Stderr(tty))
    assert progress.enabled() is shown
    bar = progress.progress(total=3, desc="x", unit="pair")
    assert bar.disable is (not shown)
    bar.close()


def test_the_driver_bar_counts_in_the_stage_unit_with_its_total_set_once(tmp_path, mini_recipe,
                                                                        monkeypatch, capsys):
    """The multi-worker bar: the stage's unit (as its one-worker bar), the shards' expected
    records summed before any shard runs; a done shard counts whole, so it ends at 100 %."""
    monkeypatch.setenv("DSBUILD_NO_PROGRESS", "0")  # a live bar, though stderr is captured
    from dsbuild.captions.stage import run_captions
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe
    from dsbuild.executors.base import DriverProgress, expected_records

    b = Build.init(tmp_path / "b", load_recipe(mini_recipe), str(mini_recipe))
    b.update(["captions.backend=template", "captions.per_agent=3"])
    sizes = expected_records(b, "captions", 2)
    assert sizes == [3, 3]
    bar = DriverProgress(b, "captions", 2, 2)
    assert (bar.bar.unit, bar.bar.total, bar.bar.n) == ("triple", 6, 0)
    run_captions(b, 0, 2, show_progress=False)
    bar.poll()
    assert (bar.bar.total, bar.bar.n) == (6, 3)
    run_captions(b, 1, 2, show_progress=False)
    bar.close()
    assert (bar.bar.total, bar.bar.n) == (6, 6)
    shown = capsys.readouterr().err.replace("\r", "\n")
    assert "0/6" in shown and "3/6" in shown and "6/6" in shown and "triple/s" in shown
    assert not re.search(r"\d+/(?!6\b)\d+ \[", shown), shown  # one total, from the start


def test_every_sharded_stage_names_its_unit_and_the_bars_use_it():
    from dsbuild.core import stages

    units = {s.name: s.unit for s in stages.all_stages() if s.sharded}
    assert units == {"captions": "triple", "generate": "pair", "filter": "pair",
                     "verify": "pair", "augment": "sample"}
    root = Path(__file__).resolve().parents[1] / "dsbuild"
    for name in units:  # a one-worker bar takes the declared unit, never a literal
        src = (root / name / "stage.py").read_text()
        assert 'unit="' not in src, name
