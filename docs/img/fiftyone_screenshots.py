"""Take docs/img/fiftyone-pairs.png from the real App: pair tiles and the dsbuild plugin.

Run from the checkout: ``python docs/img/fiftyone_screenshots.py``. It makes a small build
(the test suite's builders, images redrawn as simple scenes), starts a private mongod,
``dsbuild inspect --launch --remote`` and headless Chromium, as tests/test_fiftyone.py does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def scene(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    """A room: floor, wall, window and an armchair in ``colour``."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (256, 256), (226, 214, 196))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 170, 256, 256), fill=(150, 110, 80))
    d.rectangle((30 + seed % 40, 40, 110 + seed % 40, 120), fill=(170, 210, 240))
    d.rectangle((120, 120, 220, 200), fill=colour)
    d.rectangle((120, 100, 140, 200), fill=colour)
    d.rectangle((200, 100, 220, 200), fill=colour)
    im.save(path)


def main() -> None:
    from builders import make_build
    from conftest import MINI_RECIPE

    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe
    from dsbuild.review import fiftyone as fr

    tmp = Path(tempfile.mkdtemp(prefix="dsbuild-shots-"))
    os.environ.update(FIFTYONE_DO_NOT_TRACK="true", FIFTYONE_PLUGINS_DIR=str(tmp / "plugins"),
                      FIFTYONE_DATABASE_VALIDATION="false", DSBUILD_NO_PROGRESS="1")
    recipe = tmp / "mini.yaml"
    recipe.write_text(MINI_RECIPE)
    build = Build.init(tmp / "build", load_recipe(recipe), recipe_path=str(recipe))
    recs = make_build(build, samples=1)
    for i, p in enumerate(recs["pairs"]):
        scene(build.root / p["images"]["input"], (70, 90, 160), i)
        scene(build.root / p["images"]["output"], (170, 50, 50), i)
    port = fr.free_port()
    with fr.Mongod(tmp / "mongod") as db:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FIFTYONE_DATABASE_URI": db.uri}
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsbuild", "inspect", str(build.root), "--launch",
             "--remote", "--address", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
        try:
            url = next(line.split()[2] for line in proc.stdout
                       if line.startswith("FiftyOne App:"))
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            out = ROOT / "docs" / "img" / "fiftyone-pairs.png"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--no-first-run", "--disable-dev-shm-usage",
                            f"--user-data-dir={tmp / 'profile'}", "--window-size=1400,900",
                            "--virtual-time-budget=25000", f"--screenshot={out}", url],
                           check=True, timeout=180, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            print(f"wrote {out}")
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(60)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
