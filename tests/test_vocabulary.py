"""One vocabulary (issue 25, item 1): every renamed option's new name works, its old name still
works for one release with one line on stderr and is hidden from --help, both names with
different values are refused; renamed setting keys are read from dsbuild.yaml and --set, and a
build written with them resumes with nothing recomputed."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import click
import pytest
import yaml
from click.testing import CliRunner

from dsbuild.cli import cli
from dsbuild.core import stages
from dsbuild.core.errors import DsbuildError


def notice(old: str, new: str) -> str:
    return f"dsbuild: {old} is deprecated, use {new} (removed in the next release)"


def invoke(*args):
    """``dsbuild ARGS`` in process through the group (which resets the notices per command);
    a DsbuildError exits and prints as ``dsbuild.cli.main`` makes it."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if isinstance(r.exception, DsbuildError):
        return SimpleNamespace(exit_code=r.exception.exit_code, stdout=r.stdout,
                               stderr=f"{r.stderr}error: {r.exception}\n",
                               output=f"{r.output}error: {r.exception}\n", exception=None)
    return r


def deprecations(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if "is deprecated" in line]


def named(flag: str, text: str) -> bool:
    """Whether ``text`` names the option ``flag`` (not as part of a longer option)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


SHARDED = [st.cli_name for st in stages.all_stages() if st.sharded and st.command is None]

# (command, its positional arguments, old, new, a value, another value the new name takes)
ALIASES = [
    (["run"], ["B"], "--limit", "--per-agent", "1", "2"),
    (["run"], ["B"], "--address", "--ray-address", "auto", "h:1"),
    *[([name], ["B"], "--address", "--ray-address", "auto", "h:1") for name in SHARDED],
    (["eval"], ["tiny", "--data", "D"], "--limit", "--rows", "2", "3"),
    (["eval"], ["tiny", "--data", "D"], "--dtype", "--precision", "fp16", "bf16"),
    (["edit"], ["tiny", "{img}", "x", "--out", "o.png"], "--dtype", "--precision", "fp16",
     "bf16"),
    (["train"], ["D", "--out", "O"], "--mixed-precision", "--precision", "bf16", "fp16"),
    (["train-generator"], ["P", "--out", "O"], "--mixed-precision", "--precision", "bf16",
     "fp16"),
    (["train-generator"], ["P", "--out", "O"], "--mode", "--method", "dreambooth", "lora"),
    (["inspect"], ["B"], "--address", "--host", "0.0.0.0", "127.0.0.1"),
    (["export"], ["B"], "--to", "--export-dir", "X", "Y"),
    (["bench", "p2p"], [], "--size", "--resolution", "32", "48"),
    (["bench", "p2p"], [], "--dtype", "--precision", "fp16", "bf16"),
    (["bench", "filter"], [], "--image-size", "--resolution", "32", "48"),
    (["bench", "filter"], [], "--dtype", "--precision", "fp16", "bf16"),
    (["bench", "verify"], [], "--image-size", "--resolution", "32", "48"),
    (["bench", "verify"], [], "--dtype", "--precision", "fp16", "bf16"),
    (["bench", "scale"], [], "--limit", "--per-agent", "1", "2"),
    (["bench", "scale"], [], "--samples", "--per-triple", "1", "2"),
    (["bench", "scale"], [], "--size", "--resolution", "32", "48"),
    (["bench", "train"], [], "--mixed-precision", "--precision", "bf16", "fp16"),
]
IDS = [f"{' '.join(c)} {old}" for c, _, old, *_ in ALIASES]


@pytest.fixture
def img(tmp_path):
    from PIL import Image

    path = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(path)
    return path


@pytest.mark.parametrize("command, args, old, new, value, other", ALIASES, ids=IDS)
def test_the_old_name_is_hidden_and_disagreeing_with_the_new_one_is_refused(
        command, args, old, new, value, other, img):
    """--help (and so docs/cli.md) shows the new name only; old and new with different values
    are one usage error naming both, before any work (the values are compared in the new
    option's parameter, so the old name lands there)."""
    r = invoke(*command, "--help")
    assert r.exit_code == 0, r.output
    assert named(new, r.output) and not named(old, r.output), r.output
    args = [str(img) if a == "{img}" else a for a in args]
    r = invoke(*command, *args, old, value, new, other)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {old} (the old name of {new}) and {new} disagree; give {new} "
                      "only"], r.stderr
    assert deprecations(r) == []  # refused, not noted


def test_run_build_first_and_the_old_form_with_its_notices(tmp_path, mini_recipe):
    """`run BUILD --recipe FILE --per-agent N` is the form; `run RECIPE --out BUILD --limit N`
    still works, says so once per old name, and builds the same thing."""
    from dsbuild.core.build import Build

    new, old = tmp_path / "new", tmp_path / "old"
    r = invoke("run", new, "--recipe", mini_recipe, "--offline", "--per-agent", "1", "--until",
               "captions")
    assert r.exit_code == 0, r.output
    assert deprecations(r) == []
    r = invoke("run", mini_recipe, "--out", old, "--offline", "--limit", "1", "--until",
               "captions")
    assert r.exit_code == 0, r.output
    assert sorted(deprecations(r)) == sorted([
        notice("`dsbuild run [RECIPE] --out BUILD`", "`dsbuild run BUILD [--recipe RECIPE]`"),
        notice("--limit", "--per-agent")])
    a, b = Build.open(new), Build.open(old)
    assert a.config.captions.per_agent == b.config.captions.per_agent == 1
    assert [t["id"] for t in a.records("captions")] == [t["id"] for t in b.records("captions")]
    assert {s: a.signature(s) for s in stages.names()} == \
        {s: b.signature(s) for s in stages.names()}

    r = invoke("run", "--offline")
    assert r.exit_code == 2 and "Missing argument 'BUILD'" in r.stderr, r.output
    r = invoke("run", mini_recipe, "--out", old, "--recipe", tmp_path / "other.yaml")
    assert r.exit_code == 2 and "the recipe is given twice" in r.stderr, r.output


@pytest.mark.parametrize("command", ["run", *SHARDED])
def test_ray_address_and_its_old_name_reach_the_executor(command, mini_build):
    """--address is read as --ray-address: both are refused the same way without --executor
    ray (one line naming the new name), the old one with its notice."""
    for flag in ("--ray-address", "--address"):
        r = invoke(command, mini_build.root, flag, "auto")
        assert r.exit_code == 2
        assert "error: --ray-address is for --executor ray" in r.stderr, r.output
        assert deprecations(r) == ([notice("--address", "--ray-address")]
                                   if flag == "--address" else [])


def test_inspect_takes_host_and_its_old_name(tmp_path):
    """--host is the App's host; --address is still read (then BUILD is checked: not one)."""
    for flag in ("--host", "--address"):
        r = invoke("inspect", tmp_path / "nope", "--launch", flag, "127.0.0.1")
        assert r.exit_code == 2 and "not a dsbuild build" in r.stderr, r.output
        assert deprecations(r) == ([notice("--address", "--host")]
                                   if flag == "--address" else [])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    pytest.importorskip("datasets")
    from test_train import build_export

    return build_export(tmp_path_factory.mktemp("vocab-export"))


def test_export_dir_and_its_old_name(export, tmp_path):
    build = export.parent  # build_export writes BUILD/export
    for flag, out in (("--export-dir", tmp_path / "new"), ("--to", tmp_path / "old")):
        r = invoke("export", build, flag, out)
        assert r.exit_code == 0, r.output
        assert (out / "README.md").exists()
        assert deprecations(r) == ([notice("--to", "--export-dir")] if flag == "--to" else [])
    assert sorted(p.name for p in (tmp_path / "new" / "data").iterdir()) == \
        sorted(p.name for p in (tmp_path / "old" / "data").iterdir())


def test_eval_rows_and_precision_and_their_old_names(export, tmp_path, one_torch_thread):
    pytest.importorskip("open_clip")
    out = tmp_path / "ev"
    base = ["eval", "tiny", "--data", export, "--out", out, "--offline", "--steps", "1",
            "--resolution", "32", "--json"]
    r = invoke(*base, "--limit", "1", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert sorted(deprecations(r)) == [notice("--dtype", "--precision"),
                                       notice("--limit", "--rows")]
    old = json.loads(r.stdout)
    assert (old["settings"]["rows"], old["settings"]["precision"]) == (1, "fp32")
    r = invoke(*base, "--rows", "1", "--precision", "fp32")
    assert r.exit_code == 0, r.output
    assert deprecations(r) == []
    assert json.loads(r.stdout)["settings"] == old["settings"]


def test_edit_precision_and_its_old_name(img, tmp_path, one_torch_thread):
    pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image

    outs = {}
    for flag in ("--precision", "--dtype"):
        outs[flag] = tmp_path / f"{flag.strip('-')}.png"
        r = invoke("edit", "tiny", img, "make it blue", "--out", outs[flag], "--steps", "1",
                   "--resolution", "32", flag, "fp32")
        assert r.exit_code == 0, r.output
        assert deprecations(r) == ([notice("--dtype", "--precision")]
                                   if flag == "--dtype" else [])
    a, b = (np.asarray(Image.open(p)) for p in outs.values())
    assert a.shape == b.shape and (a == b).all()


TRAIN = ["--base", "tiny", "--resolution", "32", "--batch-size", "2", "--checkpoint-every", "1"]


def test_train_precision_old_name_and_an_old_folder_resumes(export, tmp_path,
                                                            one_torch_thread):
    """--mixed-precision no is --precision fp32; a folder whose saved settings still say
    mixed_precision: no resumes under --precision fp32 (the settings match)."""
    pytest.importorskip("accelerate")
    from dsbuild.train.loop import RUN_FILE

    out = tmp_path / "run"
    r = invoke("train", export, "--out", out, *TRAIN, "--max-steps", "1", "--mixed-precision",
               "no")
    assert r.exit_code == 0, r.output
    assert deprecations(r) == [notice("--mixed-precision", "--precision")]
    run = json.loads((out / RUN_FILE).read_text())
    assert run["settings"]["precision"] == "fp32" and "mixed_precision" not in run["settings"]
    # the folder as a run before the rename wrote it
    run["settings"]["mixed_precision"] = {"fp32": "no"}[run["settings"].pop("precision")]
    (out / RUN_FILE).write_text(json.dumps(run))
    r = invoke("train", export, "--out", out, *TRAIN, "--max-steps", "2", "--precision", "fp32",
               "--resume", "latest")
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.stdout and "resumed at step 1" in r.stdout, r.output
    assert deprecations(r) == []
    card = (out / "README.md").read_text()
    assert "precision fp32" in card


def test_train_generator_method_and_precision_old_names(tmp_path, one_torch_thread,
                                                        monkeypatch):
    pytest.importorskip("accelerate")
    from test_train_generator import draw_photos

    from dsbuild.train.card import generator_card_text

    monkeypatch.setenv("DSBUILD_CACHE", str(tmp_path / "cache"))
    photos = draw_photos(tmp_path / "photos")
    out = tmp_path / "G"
    r = invoke("train-generator", photos, "--out", out, "--base", "tiny", "--resolution", "32",
               "--max-steps", "1", "--mode", "dreambooth", "--mixed-precision", "no")
    assert r.exit_code == 0, r.output
    assert sorted(deprecations(r)) == [notice("--mixed-precision", "--precision"),
                                       notice("--mode", "--method")]
    assert "(dreambooth)" in r.stdout
    config = json.loads((out / "generator_config.json").read_text())
    assert (config["settings"]["method"], config["settings"]["precision"]) == \
        ("dreambooth", "fp32")
    assert "train-generator --method dreambooth" in (out / "README.md").read_text()
    # a folder trained before the rename still gets its card
    s = dict(config["settings"])
    s["mode"], s["mixed_precision"] = s.pop("method"), {"fp32": "no"}[s.pop("precision")]
    text = generator_card_text({**config, "settings": s})
    assert "--method dreambooth" in text and "precision fp32" in text


BENCHES = [
    (["p2p", "--steps", "1", "--k", "2", "--repeats", "1"],
     {"--size": "32", "--dtype": "fp32"}, {"resolution": 32, "precision": "fp32"}),
    (["filter", "--model", "tiny", "--images", "4", "--batch-size", "4", "--repeats", "1",
      "--workers", "1"],
     {"--image-size": "32", "--dtype": "fp32"}, {"resolution": 32, "precision": "float32"}),
    (["verify", "--model", "tiny", "--pairs", "2", "--targets-per-source", "1",
      "--batch-size", "4", "--repeats", "1", "--workers", "1"],
     {"--image-size": "32", "--dtype": "fp32"}, {"resolution": 32}),
    (["train", "--arch", "tiny", "--rows", "2", "--steps", "1", "--resolution", "16",
      "--batch-size", "2"],
     {"--mixed-precision": "no"}, {"precision": "fp32"}),
]
NEW = {"--size": "--resolution", "--image-size": "--resolution", "--dtype": "--precision",
       "--mixed-precision": "--precision"}


@pytest.mark.parametrize("args, old, want", BENCHES, ids=[b[0][0] for b in BENCHES])
def test_bench_old_names_reach_the_result(args, old, want, one_torch_thread):
    """A bench run with the old names reports the values under the new ones."""
    pytest.importorskip("diffusers")
    pytest.importorskip("open_clip")
    r = invoke("bench", *args, *(x for kv in old.items() for x in kv), "--json")
    assert r.exit_code == 0, r.output
    assert sorted(deprecations(r)) == sorted(notice(o, NEW[o]) for o in old)
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert {k: res[k] for k in want} == want


# ---------------------------------------------------------------- settings keys


def _old_keys(path):
    """Rewrite a dsbuild.yaml as a build made before the rename froze it."""
    data = yaml.safe_load(path.read_text())
    data["captions"]["limit"] = data["captions"].pop("per_agent")
    data["generate"]["limit"] = data["generate"].pop("per_triple")
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_an_old_key_build_resumes_with_nothing_recomputed(tmp_path, mini_recipe):
    from dsbuild.core.build import Build

    b = tmp_path / "b"
    r = invoke("run", b, "--recipe", mini_recipe, "--offline", "--per-agent", "1", "--until",
               "captions")
    assert r.exit_code == 0, r.output
    before = Build.open(b)
    sigs = {s: before.signature(s) for s in stages.names()}
    _old_keys(b / "dsbuild.yaml")
    old = Build.open(b)
    assert (old.config.captions.per_agent, old.config.generate.per_triple) == (1, 2)
    assert {s: old.signature(s) for s in stages.names()} == sigs
    r = invoke("run", b, "--offline", "--per-agent", "1", "--until", "captions")
    assert r.exit_code == 0, r.output
    assert "captions  up to date (skipped)" in r.stdout and "nothing to do" in r.stdout
    assert sorted(deprecations(r)) == [notice("captions.limit", "captions.per_agent"),
                                       notice("generate.limit", "generate.per_triple")]
    r = invoke("captions", b)
    assert r.exit_code == 0 and "already done (skipped)" in r.stdout, r.output
    r = invoke("status", b)
    assert r.exit_code == 0 and len(deprecations(r)) == 2, r.output
    assert "limit:" in (b / "dsbuild.yaml").read_text()  # read, never rewritten behind a back


def test_old_keys_in_set_are_read_and_a_disagreeing_pair_is_refused(tmp_path, mini_recipe):
    from dsbuild.core.build import Build

    b = tmp_path / "b"
    r = invoke("init", b, "--recipe", mini_recipe, "--set", "captions.limit=3", "--set",
               "generate.limit=4")
    assert r.exit_code == 0, r.output
    assert sorted(deprecations(r)) == [notice("captions.limit", "captions.per_agent"),
                                       notice("generate.limit", "generate.per_triple")]
    c = Build.open(b).config
    assert (c.captions.per_agent, c.generate.per_triple) == (3, 4)
    assert "limit:" not in (b / "dsbuild.yaml").read_text()

    r = invoke("captions", b, "--set", "captions.limit=1")  # a stage command's --set
    assert r.exit_code == 0, r.output
    assert Build.open(b).config.captions.per_agent == 1
    assert deprecations(r) == [notice("captions.limit", "captions.per_agent")]

    # run --offline: an old-name --set wins over the demo value of the new name
    r = invoke("run", tmp_path / "r", "--recipe", mini_recipe, "--offline", "--set",
               "captions.limit=1", "--until", "captions")
    assert r.exit_code == 0, r.output
    assert Build.open(tmp_path / "r").config.captions.per_agent == 1

    r = invoke("init", tmp_path / "c", "--recipe", mini_recipe, "--set", "captions.limit=3",
               "--set", "captions.per_agent=4")
    assert r.exit_code == 2, r.output
    assert "captions.limit=3 says otherwise; give captions.per_agent once" in r.stderr
    assert not (tmp_path / "c" / "dsbuild.yaml").exists()


def test_old_and_new_key_disagreeing_in_dsbuild_yaml_is_refused(tmp_path, mini_build):
    path = mini_build.root / "dsbuild.yaml"
    data = yaml.safe_load(path.read_text())
    data["generate"]["limit"] = 3
    data["generate"]["per_triple"] = 5
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    r = invoke("status", mini_build.root)
    assert r.exit_code == 2, r.output
    assert "limit (the old name of per_triple) and per_triple disagree (3 vs 5); keep only " \
        "per_triple" in r.stderr
    data["generate"]["limit"] = 5  # the same value twice is read
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    r = invoke("status", mini_build.root)
    assert r.exit_code == 0, r.output


def test_a_generator_plugin_reading_the_old_attribute_still_works():
    from dsbuild.generate.settings import GenerateSettings

    s = GenerateSettings(per_triple=3)
    assert s.limit == 3 and GenerateSettings(limit=3) == s


# ---------------------------------------------------------------- the mechanism


def test_renamed_option_on_its_own():
    """The old name's value (mapped through ``values``) reaches the new parameter, with the
    notice once; the same value twice is accepted; the old name is hidden."""
    from dsbuild.cli.options import renamed_option
    from dsbuild.core import deprecation

    seen = []

    @click.command()
    @renamed_option("--old", "--new", "new", values={"no": "fp32"}, type=str)
    @click.option("--new", default="auto")
    def cmd(new):
        seen.append(new)

    def run(*args):
        deprecation.reset()
        return CliRunner().invoke(cmd, list(args))

    r = run("--old", "no")
    assert r.exit_code == 0 and seen[-1] == "fp32"
    assert r.stderr.splitlines() == [notice("--old", "--new")]
    r = run("--old", "bf16", "--new", "bf16")
    assert r.exit_code == 0 and seen[-1] == "bf16"
    r = run("--old", "no", "--new", "fp32")  # the same value, after mapping
    assert r.exit_code == 0 and seen[-1] == "fp32"
    r = run("--new", "fp16")
    assert r.exit_code == 0 and seen[-1] == "fp16" and r.stderr == ""
    r = run()
    assert r.exit_code == 0 and seen[-1] == "auto"
    r = run("--old", "no", "--new", "fp16")
    assert r.exit_code == 2 and "disagree" in r.stderr
    help_text = run("--help").output
    assert named("--new", help_text) and not named("--old", help_text)


def test_docs_show_one_name_per_idea():
    """docs/cli.md (generated from --help) names none of the old options in any usage."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    usage = text.split("```text", 1)[1]  # the commands' help, after the header
    for old in ("--dtype", "--mixed-precision", "--image-size", "--size", "--mode", "--limit",
                "--samples", "--address", "--to"):
        assert not named(old, usage), old
