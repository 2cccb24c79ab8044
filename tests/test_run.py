"""`dsbuild run --offline` end to end on a small recipe; a second run does nothing."""

from __future__ import annotations

import re

import pytest

from dsbuild.cli.run import run_pipeline, run_settings
from dsbuild.core import stages


def test_offline_settings_are_demo_sized():
    s = run_settings(offline=True, limit=None)
    assert "captions.backend=template" in s and "generate.model=tiny" in s
    assert "filter.clip_model=tiny" in s and "captions.limit=2" in s
    assert "captions.limit=5" in run_settings(offline=True, limit=5)
    assert run_settings(offline=False, limit=None) == []


def test_run_offline_end_to_end_then_nothing(mini_recipe, tmp_path):
    from click.testing import CliRunner

    from dsbuild.cli import cli
    from dsbuild.core.exports import load_export

    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["run", str(mini_recipe), "--out", str(out), "--offline",
                                 "--limit", "1"])
    assert r.exit_code == 0, r.output
    assert "PLACEHOLDER images" in r.output
    assert stages.names() == ["captions", "generate", "filter", "verify", "augment",
                              "diversity", "export"]
    for stage in stages.names():  # every stage ran (none skipped)
        assert re.search(rf"^{stage}\s+done\s", r.output, re.M), (stage, r.output)
    ds = load_export(out / "export", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds["train"]) >= 1
    assert ds["train"].features["input_image"].__class__.__name__ == "Image"
    card = (out / "export" / "README.md").read_text()
    assert "Placeholder images" in card and "## Diversity" in card
    assert "Not computed" not in card  # the run wrote reports/diversity.md first
    assert (out / "export" / "grid.png").exists()

    again = run_pipeline(mini_recipe, out, offline=True, limit=1, echo=lambda s: None)
    assert again.did_nothing, [(o.stage, o.state) for o in again.outcomes]

    # the export is a stage: its marker says done; a deleted export is written again
    import shutil

    shutil.rmtree(out / "export")
    third = run_pipeline(mini_recipe, out, offline=True, limit=1, echo=lambda s: None)
    assert [o.stage for o in third.outcomes if o.state == "done"] == ["export"]
    assert (out / "export" / "README.md").exists()


def test_run_refuses_another_recipe(mini_recipe, tmp_path, mini_build):
    from dsbuild.core.errors import DsbuildError

    other = tmp_path / "other.yaml"
    other.write_text(mini_recipe.read_text().replace("name: mini", "name: other"))
    with pytest.raises(DsbuildError, match="another recipe"):
        run_pipeline(other, mini_build.root, echo=lambda s: None)
