"""Shared test setup: markers, quiet progress bars, and small build fixtures."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DSBUILD_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


# fixtures that start a real server; a test using one must carry the `server` marker
SERVER_FIXTURES = frozenset({"ls_server", "mongod"})


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    unmarked = [item.nodeid for item in items
                if SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
                and "server" not in item.keywords]
    if unmarked:  # `-m "not server"` must really leave every server out
        raise pytest.UsageError("tests that start a server need @pytest.mark.server: "
                                + ", ".join(unmarked))
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on two shared cores: oversubscribed threads make them crawl."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MINI_RECIPE = """\
name: mini
description: a two-agent recipe for tests
agents:
  - name: chairs
    level: object
    context: chairs of every kind
    count: 12
    examples:
      - {input: a red velvet armchair, edit: make the armchair blue, output: a blue velvet armchair}
    vocabulary:
      subjects: [armchair, dining chair]
      features: [armrests, cushion]
      styles: [modern, rustic]
      materials: [oak, velvet]
      colours: [red, blue, green]
  - name: living-room
    level: room
    context: living rooms
    count: 12
    examples:
      - input: a modern living room with a grey sofa and no rug
        edit: add a rug
        output: a modern living room with a grey sofa and a rug
    vocabulary:
      subjects: [living room]
      objects: [sofa, rug, coffee table, floor lamp]
      styles: [modern, scandinavian]
      materials: [oak, linen]
      colours: [grey, white, green]
      synonyms: {sofa: [couch, settee]}
"""


@pytest.fixture
def mini_recipe(tmp_path):
    p = tmp_path / "mini.yaml"
    p.write_text(MINI_RECIPE)
    return p


@pytest.fixture
def mini_build(tmp_path, mini_recipe):
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe

    return Build.init(tmp_path / "build", load_recipe(mini_recipe), recipe_path=str(mini_recipe))
