"""`dsbuild run --offline` end to end on a small recipe; a second run does nothing."""

from __future__ import annotations

import re

import pytest

from dsbuild.cli.run import run_pipeline, run_settings
from dsbuild.core import stages


def test_offline_settings_are_demo_sized():
    s = run_settings(offline=True, per_agent=None)
    assert "captions.backend=template" in s and "generate.model=tiny" in s
    assert "filter.clip_model=tiny" in s and "captions.per_agent=2" in s
    assert "captions.per_agent=5" in run_settings(offline=True, per_agent=5)
    assert run_settings(offline=False, per_agent=None) == []


def test_run_offline_end_to_end_then_nothing(mini_recipe, tmp_path):
    from click.testing import CliRunner

    from dsbuild.cli import cli
    from dsbuild.core.exports import load_export

    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["run", str(out), "--recipe", str(mini_recipe), "--offline",
                                 "--per-agent", "1"])
    assert r.exit_code == 0, r.output
    assert "PLACEHOLDER images" in r.output
    assert stages.names() == ["sources", "captions", "generate", "filter", "verify", "augment",
                              "diversity", "export"]
    for stage in stages.names()[1:]:  # every stage ran (none skipped); sources is off
        assert re.search(rf"^{stage}\s+done\s", r.output, re.M), (stage, r.output)
    assert not re.search(r"^sources\s", r.output, re.M), r.output
    ds = load_export(out / "export", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds["train"]) >= 1
    assert ds["train"].features["input_image"].__class__.__name__ == "Image"
    card = (out / "export" / "README.md").read_text()
    assert "Placeholder images" in card and "## Diversity" in card
    assert "Not computed" not in card  # the run wrote reports/diversity.md first
    assert (out / "export" / "grid.png").exists()

    again = run_pipeline(mini_recipe, out, offline=True, per_agent=1, echo=lambda s: None)
    assert again.did_nothing, [(o.stage, o.state) for o in again.outcomes]

    # the export is a stage: its marker says done; a deleted export is written again
    import shutil

    shutil.rmtree(out / "export")
    third = run_pipeline(mini_recipe, out, offline=True, per_agent=1, echo=lambda s: None)
    assert [o.stage for o in third.outcomes if o.state == "done"] == ["export"]
    assert (out / "export" / "README.md").exists()


def test_run_refuses_another_recipe(mini_recipe, tmp_path, mini_build):
    from dsbuild.core.errors import DsbuildError

    other = tmp_path / "other.yaml"
    other.write_text(mini_recipe.read_text().replace("name: mini", "name: other"))
    with pytest.raises(DsbuildError, match="another recipe"):
        run_pipeline(other, mini_build.root, echo=lambda s: None)


def _cli(*args) -> tuple[int, str]:
    """(exit status, output) of the dsbuild command line; a DsbuildError exits as ``main``
    maps it, its message part of the output."""
    from click.testing import CliRunner

    from dsbuild.cli import cli
    from dsbuild.core.errors import DsbuildError

    r = CliRunner().invoke(cli, [str(a) for a in args])
    if isinstance(r.exception, DsbuildError):
        return r.exception.exit_code, r.output + str(r.exception)
    return r.exit_code, r.output


def test_a_model_that_cannot_load_is_never_saved(mini_build, tmp_path, monkeypatch):
    """Issue 24 (4): `generate B --model /nonexistent` exited 2 but froze the model into
    dsbuild.yaml, so status showed every stage from generate on as not run."""
    from dsbuild.cli.util import save_settings
    from dsbuild.core.build import Build

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = mini_build.root / "dsbuild.yaml"
    frozen, status = cfg.read_bytes(), mini_build.status()
    not_sd = tmp_path / "not-sd"
    not_sd.mkdir()
    (not_sd / "config.json").write_text('{"model_type": "dinov2"}')
    refused = [
        (["generate", mini_build.root, "--model", "/nonexistent"], "generate.model"),
        (["generate", mini_build.root, "--model", not_sd], "no model_index.json"),
        (["generate", mini_build.root, "--model", "owner/not-cached"], "HF_HUB_OFFLINE"),
        (["verify", mini_build.root, "--set", f"verify.detector={not_sd}"], "OWLv2"),
        (["filter", mini_build.root, "--set", "filter.dino_model=owner/not-cached",
          "--set", "filter.top_k=1"], "filter.dino_model"),
    ]
    for args, said in refused:
        rc, text = _cli(*args)
        assert rc == 2 and said in text, (args, text)
        assert cfg.read_bytes() == frozen, args
        assert Build.open(mini_build.root).status() == status, args
    rc, out = _cli("init", tmp_path / "new", "--set", "generate.model=/nonexistent")
    assert rc == 2 and not (tmp_path / "new").exists(), out

    sd = tmp_path / "sd"  # a folder of the right kind is saved
    sd.mkdir()
    (sd / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert save_settings(mini_build, [f"generate.model={sd}"]) == [
        ("generate.model", "stable-diffusion-v1-5/stable-diffusion-v1-5", str(sd))]
    assert Build.open(mini_build.root).config.generate.model == str(sd)


def test_run_offline_over_a_tuned_build_refuses_listing_the_differences(mini_recipe, tmp_path):
    """Issue 24 (4): `run EXISTING --offline` rewrote a tuned build's frozen settings
    (32 px, captions.per_agent 1) to the demo's and regenerated everything, silently."""
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe

    b = Build.init(tmp_path / "b", load_recipe(mini_recipe), recipe_path=str(mini_recipe),
                   overrides=["generate.height=32", "captions.per_agent=1"])
    cfg = b.root / "dsbuild.yaml"
    frozen = cfg.read_bytes()
    rc, out = _cli("run", b.root, "--recipe", mini_recipe, "--offline")
    assert rc == 2, out
    for line in ("generate.height: 32 -> 64", "captions.per_agent: 1 -> 2",
                 'generate.model: "stable-diffusion-v1-5/stable-diffusion-v1-5" -> "tiny"'):
        assert line in out, out
    assert "--reconfigure" in out
    assert cfg.read_bytes() == frozen and not (b.root / "triples").exists()

    rc, out = _cli("run", b.root, "--recipe", mini_recipe, "--offline", "--reconfigure",
                   "--until", "captions")
    assert rc == 0, out
    c = Build.open(b.root).config
    assert (c.generate.height, c.captions.per_agent, c.generate.model) == (64, 2, "tiny")


def test_run_set_wins_over_offline_and_an_identical_run_does_nothing(mini_recipe, tmp_path):
    """Issue 24 (4): `dsbuild run` takes --set as init does; --offline fills in the rest."""
    from dsbuild.core.build import Build

    assert "generate.steps=4" not in run_settings(True, None, ["generate.steps=3"])
    b = tmp_path / "b"
    args = ["run", b, "--recipe", mini_recipe, "--offline", "--set", "generate.steps=3",
            "--set", "captions.per_agent=1", "--until", "captions"]
    rc, said = _cli(*args)
    assert rc == 0, said
    c = Build.open(b).config
    assert (c.generate.steps, c.captions.per_agent, c.generate.model) == (3, 1, "tiny")
    frozen = (b / "dsbuild.yaml").read_bytes()
    rc, said = _cli(*args)
    assert rc == 0 and "nothing to do" in said, said
    assert (b / "dsbuild.yaml").read_bytes() == frozen
    rc, said = _cli("run", b, "--recipe", mini_recipe, "--offline", "--until", "captions")
    assert rc == 2 and "generate.steps: 3 -> 4" in said, said
