"""Every doc example marked ``<!-- offline-example -->`` runs as written (docs/architecture.md,
"Doc examples that run"): README.md's and docs/*.md's marked ``bash`` blocks, run with bash in
a fresh folder that holds the checkout's ``recipes/`` and ``.venv`` (as a clone does), a doc's
blocks in order in one folder, with stderr a pipe and neither ``DSBUILD_NO_PROGRESS`` nor
``CI`` set (what a user's redirected run sees). Each must exit 0 and print no library message
that ``dsbuild.core.quiet`` hides, no Python or library warning and no progress bar.

A doc whose first command ran first in another doc (the offline demo, in most docs) starts
from a copy of the folder as that command left it; the command still runs and finds every
stage up to date, so each doc stays self-contained and the demo is built once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsbuild.core.quiet import HIDDEN

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- offline-example -->"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = ("recipes", "label_config", ".venv")  # what a checkout's root has
# what a doc example must not print: the hidden library messages, Python and library
# warnings (dsbuild's own "warning: model 'tiny' ..." lines are lower-case), progress bars
NOISE = [re.compile(h.message) for h in HIDDEN] + [
    re.compile(r"\b[A-Z]\w*Warning: "), re.compile(r"\bWARNING\b"), re.compile("\r"),
    re.compile(r"\d+it/s\]"),
]
SEEDS: dict[str, Path] = {}  # first command -> the folder it left (a copy)


def fenced_blocks(text: str):
    """(marked, language, body) of each fenced block of a markdown text."""
    lines = text.splitlines()
    i, marked = 0, False
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("```"):
            lang, body, i = line[3:].strip(), [], i + 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            yield marked, lang, "\n".join(body) + "\n"
            marked = False
        elif line:
            marked = line == MARK
        i += 1


def examples(doc: Path) -> list[str]:
    return [body for marked, lang, body in fenced_blocks(doc.read_text()) if marked]


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        cmd = re.sub(r"\s+#.*$|^\s*#.*$", "", cur).strip()
        if cmd:
            out.append(re.sub(r"\s+", " ", cmd))
        cur = ""
    return out


def simple_commands(block: str) -> list[str]:
    """Each command of a block, ``&&``/``;`` lists split, leading VAR=value dropped."""
    found = []
    for cmd in commands(block):
        for part in re.split(r"\s*(?:&&|;|\|\|)\s*", cmd):
            found.append(re.sub(r"^(\w+=\S*\s+)+", "", part))
    return found


def dsbuild_commands(block: str) -> list[str]:
    return [c for c in simple_commands(block) if re.match(r"(\.venv/bin/)?dsbuild\s", c)]


def runs_offline(cmd: str) -> bool:
    return "--offline" in cmd or re.search(r"\btiny\b", cmd) is not None


def offline_block(block: str) -> bool:
    """Only dsbuild commands that run offline, and file helpers: an example to run as is."""
    cmds = simple_commands(block)
    ds = dsbuild_commands(block)
    helpers = [c for c in cmds if c not in ds]
    return bool(ds) and all(runs_offline(c) for c in ds) and all(
        re.match(r"(mkdir|cp|ls|cd [\w./-]+$|\w+=)", c) for c in helpers)


MARKED = [d for d in DOCS if examples(d)]


def test_the_docs_have_runnable_examples():
    """The convention is in use where the issue asked for it (the demo, train, eval...)."""
    names = {d.name for d in MARKED}
    assert {"README.md", "getting-started.md", "train.md", "eval.md", "localize.md",
            "train-generator.md", "captions.md", "diversity.md"} <= names, names
    for doc in MARKED:
        for marked, lang, body in fenced_blocks(doc.read_text()):
            if marked:
                assert lang == "bash", f"{doc.name}: a marked block must be ```bash"
                assert dsbuild_commands(body), f"{doc.name}: a marked block runs no dsbuild"


def test_every_offline_block_is_marked():
    """A bash block whose every dsbuild command runs offline is an example the test runs."""
    unmarked = []
    for doc in DOCS:
        for marked, lang, body in fenced_blocks(doc.read_text()):
            if lang == "bash" and not marked and offline_block(body):
                unmarked.append(f"{doc.relative_to(ROOT)}: {dsbuild_commands(body)[0]}")
    assert not unmarked, f"mark these with {MARK}, or make them examples of real use: " \
                         f"{unmarked}"


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DSBUILD_NO_PROGRESS", "CI", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DSBUILD_CACHE=str(home / "dsbuild-cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _bash(script: str, cwd: Path, env: dict, what: str) -> str:
    r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{what} exited {r.returncode}:\n{out[-4000:]}"
    for pat in NOISE:
        m = pat.search(out)
        assert m is None, f"{what} printed {m.group(0)!r}:\n{out[max(0, m.start() - 800):][:2000]}"
    return out


@pytest.mark.parametrize("doc", MARKED, ids=[d.name for d in MARKED])
def test_doc_examples_run(doc, tmp_path_factory):
    work = tmp_path_factory.mktemp(doc.stem)
    env = _env(work.parent)
    blocks = examples(doc)
    first = dsbuild_commands(blocks[0])[0].removeprefix(".venv/bin/")
    if first in SEEDS:
        shutil.copytree(SEEDS[first], work, symlinks=True, dirs_exist_ok=True)
    else:
        for name in LINKED:
            if (ROOT / name).exists():
                (work / name).symlink_to(ROOT / name)
        if first.startswith("dsbuild run "):  # the expensive one: made once, then copied
            _bash(first, work, env, f"{doc.name}: {first}")
            seed = tmp_path_factory.mktemp("seed")
            shutil.copytree(work, seed, symlinks=True, dirs_exist_ok=True)
            SEEDS[first] = seed
    for i, block in enumerate(blocks, 1):
        out = _bash(block, work, env, f"{doc.name}, offline example {i}")
        if "dsbuild run " in block and "--offline" in block:  # the demo says cuts in one line
            cut = re.findall(r"captions? longer than 77 tokens (?:was|were) cut", out)
            assert len(cut) <= 1, out
