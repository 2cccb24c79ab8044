"""Tiny local copies of the public eval suites, in each suite's own published layout, made by
the tests (nothing is downloaded): MagicBrush's unzipped test folder (``edit_sessions.json`` +
``images/<id>/``) and GEdit-Bench's Hub layout (``data/train-*.parquet`` with its columns)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def png(path: Path, seed: int, size: int | tuple[int, int] = 32) -> Path:
    """A random RGB PNG of ``size`` (a side, or (width, height))."""
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


MAGICBRUSH_SESSIONS = {"139": ["make the sofa blue", "add a lamp on the table"],
                       "30": ["paint the wall green"]}


def magicbrush_test_folder(root: Path, sessions: dict[str, list[str]] = MAGICBRUSH_SESSIONS,
                           size: int | tuple[int, int] = 32) -> Path:
    """MagicBrush's test zip, unzipped: ``edit_sessions.json`` and ``images/<id>/<id>-input.png``,
    ``<id>-output<k>.png`` and ``<id>-mask<k>.png`` (one per turn), all of ``size``."""
    data: dict[str, list[dict]] = {}
    for n, (sid, instructions) in enumerate(sessions.items()):
        png(root / "images" / sid / f"{sid}-input.png", 1000 + n, size)
        turns = []
        for k, instr in enumerate(instructions, 1):
            png(root / "images" / sid / f"{sid}-output{k}.png", 2000 + 10 * n + k, size)
            png(root / "images" / sid / f"{sid}-mask{k}.png", 3000 + 10 * n + k, size)
            turns.append({"input": f"{sid}-input.png" if k == 1 else f"{sid}-output{k - 1}.png",
                          "mask": f"{sid}-mask{k}.png", "output": f"{sid}-output{k}.png",
                          "instruction": instr})
        data[sid] = turns
    (root / "edit_sessions.json").write_text(json.dumps(data))
    return root


GEDIT_ROWS = [  # key, task_type, instruction, language, intersection
    ("k1", "color_alter", "make the car red", "en", True),
    ("k2", "color_alter", "turn the sky orange", "en", False),
    ("k3", "subject-add", "add a dog on the grass", "en", True),
    ("k4", "style_change", "make it look like a watercolour", "en", False),
    ("k5", "subject-add", "在桌子上加一个杯子", "cn", True),
]


def gedit_dataset(rows, images):
    """GEdit-Bench's Hub columns for ``rows`` (key, task_type, instruction, language,
    intersection, ...) and their input images (PIL)."""
    import datasets

    return datasets.Dataset.from_dict(
        {"key": [r[0] for r in rows], "task_type": [r[1] for r in rows],
         "instruction": [r[2] for r in rows], "instruction_language": [r[3] for r in rows],
         "input_image": images, "input_image_raw": images,
         "Intersection_exist": [r[4] for r in rows]},
        features=datasets.Features({
            "key": datasets.Value("string"), "task_type": datasets.Value("string"),
            "instruction": datasets.Value("string"),
            "instruction_language": datasets.Value("string"),
            "input_image": datasets.Image(), "input_image_raw": datasets.Image(),
            "Intersection_exist": datasets.Value("bool")}))


def gedit_folder(root: Path, rows=GEDIT_ROWS) -> Path:
    """GEdit-Bench's Hub layout: ``data/train-00000-of-00001.parquet`` (:func:`gedit_dataset`)."""
    from PIL import Image

    images = [png(root / "src" / f"{r[0]}.png", 3000 + i) for i, r in enumerate(rows)]
    ds = gedit_dataset(rows, [Image.open(p) for p in images])
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root
