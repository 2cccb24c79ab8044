"""A designer's own session (``dsbuild edit --session DIR``): a tree of edits grown one
``dsbuild edit`` at a time with a trained editor, each node's input its parent's output.

The folder holds the root (``root.png``, the first call's IMAGE), one PNG per node and
``session.json``, written atomically after each edit::

    {"version": 1, "root": {"id": "root", "image": "root.png", "source": <IMAGE's name>,
                            "pixels": <hash of its RGB pixels>, "time": ...},
     "nodes": [{"id": "n1", "parent": "root", "turn": 1, "instruction": ..., "image":
                "n1.png", "seed": 0, "model": ..., "time": ..., "guidance": ...,
                "image_guidance": ..., "steps": ...}, ...]}

Node ids are short (``n1``, ``n2``, …) so ``--from`` is easy to type. The page
(``tree.html``/``tree.png``) is drawn by :mod:`dsbuild.review.tree`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from dsbuild.core.errors import DsbuildError

SESSION_FILE = "session.json"
LOCK_FILE = ".session.lock"
ROOT = "root"
VERSION = 1


def _pixels(image) -> str:
    """A hash of an RGB image's size and pixels (the same picture in any file format)."""
    h = hashlib.sha256(f"{image.size[0]}x{image.size[1]}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:16]


def _open_rgb(path: str | Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DsbuildError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


def load_session(folder: str | Path) -> dict:
    """``session.json`` of a session folder, checked (a clear error where it is not one)."""
    path = Path(folder) / SESSION_FILE
    if not path.is_file():
        raise DsbuildError(f"{folder}: not a design session (no {SESSION_FILE}); make one with "
                           "`dsbuild edit MODEL IMAGE INSTRUCTION --session DIR`")
    try:
        sess = json.loads(path.read_text())
        ok = isinstance(sess, dict) and isinstance(sess.get("root"), dict) \
            and isinstance(sess.get("nodes"), list)
    except ValueError as exc:
        raise DsbuildError(f"{path}: not valid JSON ({exc})") from None
    if not ok:
        raise DsbuildError(f"{path}: not a design session file (needs 'root' and 'nodes')")
    return sess


def node_ids(sess: dict) -> list[str]:
    """Every node id of a session, the root first."""
    return [ROOT, *(n["id"] for n in sess["nodes"])]


def parent_of(sess: dict, start: str | None) -> dict:
    """The node ``--from`` names (default: the last node added, the root before any edit):
    its id, image and turn."""
    nodes = {ROOT: {"id": ROOT, "image": sess["root"]["image"], "turn": 0}}
    nodes.update({n["id"]: n for n in sess["nodes"]})
    if start is None:
        return sess["nodes"][-1] if sess["nodes"] else nodes[ROOT]
    if start not in nodes:
        raise DsbuildError(f"--from {start!r}: no such node in this session; nodes: "
                           + ", ".join(node_ids(sess)))
    return nodes[start]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _new_session(folder: Path, image: str | Path) -> dict:
    from dsbuild.core.records import write_image

    if folder.exists() and not folder.is_dir():
        raise DsbuildError(f"--session {folder}: a file, not a folder")
    if folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir()):
        raise DsbuildError(f"--session {folder}: a folder that holds other files and no "
                           f"{SESSION_FILE}; give a new or empty folder")
    src = _open_rgb(image)
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "root.png", src)
    return {"version": VERSION, "root": {"id": ROOT, "image": "root.png",
                                          "source": Path(image).name, "pixels": _pixels(src),
                                          "time": _now()}, "nodes": []}


def _check_root(sess: dict, folder: Path, image: str | Path) -> None:
    """IMAGE must be the session's root (the same pixels) on every later call."""
    if _pixels(_open_rgb(image)) != sess["root"].get("pixels"):
        raise DsbuildError(f"{image}: not the root image of the session {folder} (which "
                           f"started from {sess['root'].get('source')}); pass that image or "
                           f"{folder / sess['root']['image']}, or start a new --session folder")


def grow(folder: str | Path, model: str, image: str | Path, instruction: str, *,
         start: str | None = None, seed: int = 0, guidance: float = 7.5,
         image_guidance: float = 1.5, steps: int = 50, resolution: int | None = None,
         device: str = "auto", dtype: str = "auto", pipe=None, localize=None,
         mask: str | Path | None = None, agent=None) -> dict:
    """Add one edit to the session in ``folder`` (made from ``image`` on the first call):
    the node under ``start`` (default: the last node), edited from its parent's image by
    :func:`dsbuild.evaluate.edit.edit_image` (``localize``, ``mask``, ``agent``: as there; the
    region is kept as ``<node>_mask.png``). Returns the node recorded."""
    from dsbuild.core.locks import hold
    from dsbuild.core.records import write_json
    from dsbuild.evaluate.edit import edit_image

    folder = Path(folder)
    if not instruction.strip():
        raise DsbuildError("the instruction is empty")
    if start is not None and not (folder / SESSION_FILE).exists():
        raise DsbuildError(f"--from {start!r}: {folder} has no session yet; the first "
                           "edit starts from IMAGE (leave --from out)")
    with hold(folder / LOCK_FILE, f"design session {folder}"):
        if (folder / SESSION_FILE).exists():
            sess = load_session(folder)
            _check_root(sess, folder, image)
        else:
            sess = _new_session(folder, image)
        parent = parent_of(sess, start)
        taken = {n["id"] for n in sess["nodes"]}
        k = len(sess["nodes"]) + 1
        while f"n{k}" in taken:
            k += 1
        node_id = f"n{k}"
        edit_image(model, folder / parent["image"], instruction, folder / f"{node_id}.png",
                   seed=seed, guidance=guidance, image_guidance=image_guidance, steps=steps,
                   resolution=resolution, device=device, dtype=dtype, pipe=pipe,
                   localize=localize, mask=mask, agent=agent)
        node = {"id": node_id, "parent": parent["id"], "turn": int(parent.get("turn", 0)) + 1,
                "instruction": instruction, "image": f"{node_id}.png", "seed": seed,
                "model": str(model), "time": _now(), "guidance": guidance,
                "image_guidance": image_guidance, "steps": steps}
        if localize is not None:
            node["mask"] = f"{node_id}_mask.png"
        sess["nodes"].append(node)
        write_json(folder / SESSION_FILE, sess)
    return node
