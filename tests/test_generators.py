"""The generator interface: a generator that exists only in the tests (tests/plugins/
colour_shift.py) runs through ``dsbuild run --until export`` with its parameters in the pair
records and the export; P2P builds keep their signatures; unknown or missing generators are
refused with what to set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsbuild.core import generators
from dsbuild.core.hashing import signature
from dsbuild.generate.settings import GenerateSettings

PLUGINS = Path(__file__).parent / "plugins"


def dsbuild(*args, plugin: bool = True, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSBUILD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DSBUILD_PLUGINS", None)
    if plugin:
        env["DSBUILD_PLUGINS"] = "colour_shift"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS),
                                                          env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "dsbuild", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("r*.jsonl")) for line in
            f.read_text().splitlines() if line.strip()]


def test_a_plugin_generator_runs_to_the_export(tmp_path, mini_recipe):
    import pyarrow.parquet as pq

    b = tmp_path / "b"
    r = dsbuild("run", b, "--recipe", mini_recipe, "--offline", "--per-agent", "1", "--until",
                "export", "--set", "generate.generator=colour-shift",
                "--set", "generate.colour-shift.channel=green")
    assert r.returncode == 0, r.stdout + r.stderr
    pairs = records(b / "pairs")
    assert pairs and {p["generator"] for p in pairs} == {"colour-shift"}
    for p in pairs:
        assert p["params"]["channel"] == "green" and 0.1 <= p["params"]["shift"] <= 0.5
        assert p["model"] == "colour-shift:green"
        # the target is the source with green shifted up, nothing else changed
        import numpy as np
        from PIL import Image

        a = np.asarray(Image.open(b / p["images"]["input"])).astype(int)
        c = np.asarray(Image.open(b / p["images"]["output"])).astype(int)
        assert (a[..., [0, 2]] == c[..., [0, 2]]).all() and (c[..., 1] >= a[..., 1]).all()
    rows = [row for f in sorted((b / "export" / "data").glob("*.parquet"))
            for row in pq.read_table(f).to_pylist()]
    assert rows
    by_pair = {p["id"]: p for p in pairs}
    for row in rows:
        if row["no_change"]:
            continue
        pair = by_pair[row["pair_id"]]
        assert row["generator"] == "colour-shift" and row["channel"] == "green"
        assert row["colour_shift"] == pytest.approx(pair["params"]["shift"])
        assert json.loads(row["params"]) == pair["params"]
        assert "p2p_mode" not in row and "guidance" not in row  # no P2P columns
    card = (b / "export" / "README.md").read_text()
    assert "colour-shift" in card and "colour_shift" in card

    # a build that names a generator whose plugin is not installed is refused, naming it
    r = dsbuild("status", b, plugin=False)
    assert r.returncode != 0 and "colour-shift" in r.stderr + r.stdout


def test_p2p_builds_sign_as_before_generators():
    s = GenerateSettings()
    assert "generator" not in s.signature_dict()
    assert s.signature_dict() == GenerateSettings(generator="p2p").signature_dict()
    # a P2P setting changes the P2P signature ...
    assert signature(GenerateSettings(mode="replace").signature_dict()) != \
        signature(s.signature_dict())


def test_unknown_generator_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown generator 'nope'.*p2p"):
        GenerateSettings(generator="nope")
    with pytest.raises(ValueError, match="(?s)colour.*Extra inputs are not permitted"):
        GenerateSettings.model_validate({"colour": {"shift": [0, 1]}})  # no such generator


def test_p2p_declares_what_readers_show():
    cols = generators.param_columns(["p2p"])
    assert list(cols) == ["p2p_mode", "p2p_steps", "guidance", "cross_replace",
                          "self_replace", "scheduler", "blend_words", "equalizer"]
    old_pair = {"params": {"mode": "self", "steps": 4, "guidance": 8.5, "cross_replace": None,
                           "self_replace": 0.4, "blend_words": [["a"], ["b"]],
                           "equalizer": None, "scheduler": "ddim"}}  # no "generator": P2P
    assert generators.generator_of(old_pair) == "p2p"
    vals = generators.param_values(old_pair)
    assert vals["p2p_steps"] == 4 and vals["guidance"] == 8.5 and vals["cross_replace"] is None
    assert vals["blend_words"] == '[["a"], ["b"]]'
