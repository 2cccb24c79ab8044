"""The wheel carries every file the package reads: the built-in recipe and the label configs.

Built as a release is (sdist, then the wheel from the sdist) with the venv's setuptools, so no
download; then the wheel is unpacked (a site-packages layout) and imported from a folder
outside the checkout. `.ci/run` goes further: a fresh venv and `dsbuild run --offline`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"recipes": "*.yaml", "label_config": "*.xml"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="pip install 'dsbuild[test]' (the build package)")
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "-q", "--no-isolation",
                        "--skip-dependency-check", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def shipped_files() -> dict[str, Path]:
    """Path inside the wheel -> the checkout's file it must be a copy of."""
    files = {f"dsbuild/data/{folder}/{p.name}": p
             for folder, pattern in SHIPPED.items() for p in sorted((ROOT / folder).glob(pattern))}
    assert "dsbuild/data/recipes/interior-design.yaml" in files
    assert "dsbuild/data/label_config/pair_review.xml" in files
    return files


def test_wheel_and_sdist_hold_the_recipe_and_every_label_config(dist):
    (wheel,) = dist.glob("dsbuild-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for inside, source in shipped_files().items():
            assert inside in names, f"{inside} is not in {wheel.name}"
            assert z.read(inside) == source.read_bytes(), inside
    assert not any(n.startswith(("recipes/", "label_config/")) for n in names)  # no top level
    (sdist,) = dist.glob("dsbuild-*.tar.gz")
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    for folder, pattern in SHIPPED.items():
        for p in (ROOT / folder).glob(pattern):
            assert f"{folder}/{p.name}" in members, f"the sdist lacks {folder}/{p.name}"


def test_loaders_find_the_files_in_an_installed_wheel(dist, tmp_path):
    (wheel,) = dist.glob("dsbuild-*.whl")
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import dsbuild, json\n"
            "from dsbuild.core.config import default_recipe_path, load_recipe\n"
            "from dsbuild.review.labelstudio import CONFIG_DIR, PAIR_CONFIG\n"
            "print(json.dumps({'module': dsbuild.__file__, 'recipe': str(default_recipe_path()),"
            " 'agents': len(load_recipe(default_recipe_path()).agents),"
            " 'configs': sorted(p.name for p in CONFIG_DIR.glob('*.xml')),"
            " 'pair': str(PAIR_CONFIG)}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                       text=True, timeout=120, env={"PYTHONPATH": str(site), "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("module", "recipe", "pair"):
        assert Path(got[key]).is_relative_to(site), (key, got[key])  # not the checkout's
    assert got["agents"] > 0
    assert got["configs"] == sorted(p.name for p in (ROOT / "label_config").glob("*.xml"))


def test_wheel_holds_the_fiftyone_plugin(dist):
    """FiftyOne finds a plugin by its fiftyone.yml: package data, not code."""
    (wheel,) = dist.glob("dsbuild-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in ("fiftyone.yml", "__init__.py"):
            inside = f"dsbuild/review/fiftyone/plugin/{f}"
            assert inside in names, f"{inside} is not in {wheel.name}"
            assert z.read(inside) == (ROOT / inside).read_bytes(), inside
