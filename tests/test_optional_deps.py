"""Optional dependencies: each command without its extra exits 2 with the pip line, early;
the light commands (init, captions, report diversity, status) need none of the heavy ones.

A package is made unimportable in a child process by a meta-path finder that raises
``ModuleNotFoundError`` for it (what Python raises when it is not installed); the child runs
the real ``dsbuild`` entry point (``dsbuild.cli.main``) once per command and reports exit
code, output and any uncaught exception. One child per hidden set keeps the start-up cost of
the CLI (click, pydantic) to two processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from builders import make_build

DRIVER = textwrap.dedent('''
    import contextlib, importlib.abc, io, json, sys, traceback

    HIDDEN = set(sys.argv[1].split(","))

    class Hide(importlib.abc.MetaPathFinder):
        """Every hidden package (and its submodules) imports as if not installed."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    hidden_ok = []
    for pkg in sorted(HIDDEN):
        try:
            __import__(pkg)
        except ModuleNotFoundError:
            hidden_ok.append(pkg)

    from dsbuild.cli import main

    results = []
    for args in json.loads(sys.argv[2]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                code = "uncaught"
                traceback.print_exc()
        results.append({"args": args, "code": code, "out": out.getvalue() + err.getvalue()})
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
    with open(sys.argv[3], "w") as fh:
        json.dump({"hidden": hidden_ok, "loaded": loaded, "results": results}, fh)
''')


def run_hidden(tmp_path: Path, hidden: list[str], commands: list[list[str]]) -> list[dict]:
    """Run each dsbuild command in one child where ``hidden`` cannot be imported."""
    script, report = tmp_path / "driver.py", tmp_path / f"result-{'-'.join(hidden)}.json"
    script.write_text(DRIVER)
    env = {**os.environ, "DSBUILD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), ",".join(hidden), json.dumps(commands),
                           str(report)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(report.read_text())
    assert got["hidden"] == sorted(hidden), "the test could not hide " + str(hidden)
    assert got["loaded"] == [], f"hidden modules were imported: {got['loaded']}"
    return got["results"]


def needs_extra(result: dict, extra: str) -> None:
    """Exit 2, the pip line of ``extra``, and no traceback."""
    text = result["out"]
    assert result["code"] == 2, f"{result['args']}: exit {result['code']}\n{text}"
    assert f"pip install 'dsbuild[{extra}]'" in text, f"{result['args']}:\n{text}"
    assert "Traceback" not in text, f"{result['args']}:\n{text}"


def works(result: dict) -> None:
    assert result["code"] == 0, f"{result['args']}: exit {result['code']}\n{result['out']}"


def test_without_torch(tmp_path, mini_recipe):
    b, b2 = str(tmp_path / "b"), str(tmp_path / "b2")
    init, captions, diversity, status, generate, filter_, verify, run = run_hidden(
        tmp_path, ["torch"], [
            ["init", b, "--recipe", str(mini_recipe)],
            ["captions", b, "--backend", "template"],
            ["report", "diversity", b],
            ["status", b],
            ["generate", b],
            ["filter", b],
            ["verify", b],
            ["run", b2, "--recipe", str(mini_recipe), "--offline"],
        ])
    for r in (init, captions, diversity, status):
        works(r)
    assert "captions" in status["out"] and "complete" in status["out"]
    needs_extra(generate, "gen")
    needs_extra(filter_, "filter")
    needs_extra(verify, "filter")
    needs_extra(run, "gen")  # captions ran; generate stops the run with its pip line
    assert (Path(b2) / "triples" / "r00000.jsonl").exists()
    assert not (Path(b) / "pairs").exists()  # failed before any work


def test_without_review_and_export_extras(tmp_path, mini_build):
    make_build(mini_build)  # triples, pairs, scores: only the extra is missing
    b = str(mini_build.root)
    inspect, push, export, status = run_hidden(
        tmp_path, ["datasets", "fiftyone", "label_studio_sdk"], [
            ["inspect", b],
            ["review", "push", b, "--url", "http://127.0.0.1:9"],
            ["export", b],
            ["status", b],
        ])
    needs_extra(inspect, "fiftyone")
    needs_extra(push, "review")
    needs_extra(export, "export")
    works(status)
    assert not (mini_build.root / "export").exists()


LIGHT_MODULES = ("dsbuild.core.stages", "dsbuild.core.build", "dsbuild.core.join", "dsbuild.generate.stage",
                 "dsbuild.filter.stage", "dsbuild.filter.report", "dsbuild.review.fiftyone",
                 "dsbuild.review.labelstudio", "dsbuild.export.writer", "dsbuild.cli.run",
                 "dsbuild.verify.stage", "dsbuild.verify.report")
HEAVY = ("torch", "diffusers", "open_clip", "transformers", "fiftyone", "label_studio_sdk",
         "datasets", "pyarrow", "huggingface_hub")


def test_stage_modules_import_without_heavy_packages():
    """Declaring and importing a stage never imports torch & co.: only running it does."""
    code = textwrap.dedent(f"""
        import importlib, json, sys
        heavy, out = set({HEAVY!r}), {{}}
        for m in {LIGHT_MODULES!r}:
            importlib.import_module(m)
            out[m] = sorted({{k.split(".")[0] for k in sys.modules}} & heavy)
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert loaded == {m: [] for m in LIGHT_MODULES}


def test_the_extras_table_matches_pyproject():
    """dsbuild.core.deps declares every extra of pyproject.toml with what it installs."""
    import re

    import pytest

    from dsbuild.core import deps

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(extras) - {"test", "all"} == set(deps.EXTRAS)
    for extra, requirements in extras.items():
        if extra in ("test", "all"):
            continue
        includes = [inc for r in requirements if r.startswith("dsbuild[")
                    for inc in r[len("dsbuild["):r.index("]")].split(",")]
        wanted = {re.split(r"[<>=\[ ;]", r)[0].lower().replace("_", "-")
                  for r in requirements if not r.startswith("dsbuild[")}
        declared = {deps.DISTRIBUTION.get(m, m).lower().replace("_", "-")
                    for m in deps.EXTRAS[extra]}
        assert tuple(includes) == deps.INCLUDES.get(extra, ()), extra
        assert wanted <= declared, f"{extra}: {sorted(wanted - declared)} not in deps.EXTRAS"
    assert deps.extra_of("open_clip.model") == "filter" and deps.extra_of("peft") == "train"
