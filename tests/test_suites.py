"""``dsbuild eval --suite``: one report over the export's own split and the public suites (tiny
local copies in each suite's layout, a scripted judge server on 127.0.0.1 for the VLM-judged
scores), base vs fine-tuned side by side with deltas, the model card updated; a kill mid-suite
and a resume give what an unbroken run gives, editing only what was missing."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("datasets")

from openai_server import OpenAIServer, chat  # noqa: E402
from suite_copies import gedit_folder, magicbrush_test_folder  # noqa: E402
from test_eval import trained  # noqa: E402  (the export and a model trained on it)
from test_train import dsbuild, error_lines  # noqa: E402

from dsbuild.cli import cli  # noqa: E402

__all__ = ["trained"]  # the fixture, shared with test_eval

TINY = ["--offline", "--steps", "2", "--resolution", "32", "--suite-resolution", "32"]


def judge_reply(req: dict, n: int):
    """Answers any rubric: each field the system prompt asks for, the top of its scale minus
    one (so the test knows every score), as the model ``judge-x-2026``."""
    system = req["messages"][0]["content"]
    lo, hi = (int(v) for v in re.search(r"from (\d+) to (\d+)", system).groups())
    fields = re.findall(r'"(\w+)": <int>', system)
    return chat(json.dumps({**{f: hi - 1 for f in fields}, "reason": "fine"}),
                model="judge-x-2026")


def test_one_report_over_the_export_magicbrush_and_gedit_bench(trained, tmp_path, monkeypatch,
                                                               one_torch_thread):
    export, model = trained
    mb = magicbrush_test_folder(tmp_path / "magicbrush")
    ge = gedit_folder(tmp_path / "gedit")
    out = tmp_path / "ev"
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with OpenAIServer(handler=judge_reply) as srv:
        r = CliRunner().invoke(cli, [
            "eval", "tiny", str(model), "--suite", "export", "--suite", "magicbrush",
            "--suite", "gedit-bench", "--data", str(export), "--suite-data",
            f"magicbrush={mb}", "--suite-data", f"gedit-bench={ge}", "--judge-model",
            "judge-x", "--judge-base-url", srv.base_url, "--out", str(out), *TINY])
        asked = len(srv.chat_requests)
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    assert md in r.stdout
    for head in ("## Summary: specialisation and general skill", "## export: own test split",
                 "## magicbrush: ", "## gedit-bench: "):
        assert head in md, head
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert re.search(r"^\| export \| specialisation", summary, re.M)
    assert re.search(r"^\| magicbrush \| general skill", summary, re.M)
    assert re.search(r"^\| gedit-bench \| general skill", summary, re.M)
    assert "Δ local:model" in summary
    res = json.loads((out / "report.json").read_text())
    assert res["base"] == "tiny" and res["models"] == ["tiny", str(model)]
    for m in res["models"]:
        ex = res["suites"]["export"]["eval"]["models"][m]["edit"]
        assert math.isfinite(ex["clip_dir"])
        mb_m = res["suites"]["magicbrush"]["models"][m]["metrics"]
        for key in ("l1", "clip_i", "dino", "final_l1", "final_clip_i", "final_dino"):
            assert math.isfinite(mb_m[key]), (m, key)
        g = res["suites"]["gedit-bench"]["models"][m]
        # every score the judge gave was 9 of 10: SC = PQ = O = 9 on every English row
        assert g["metrics"]["sc"] == g["metrics"]["pq"] == pytest.approx(9.0)
        assert g["metrics"]["o"] == pytest.approx(9.0)
        assert g["judge"]["model_requested"] == "judge-x"
        assert set(g["judge"]["models_reported"]) == {"judge-x-2026"}
    # the server reported another name than the one asked for: the report says to pin it
    assert "judge-x-2026" in md and "pin the reported snapshot" in md
    # 4 English GEdit rows x (SC + PQ) x 2 models
    assert asked == 4 * 2 * 2
    assert (out / "report.png").stat().st_size > 0
    card = (model / "README.md").read_text()
    assert "## Summary: specialisation and general skill" in card and "gedit-bench" in card

    # nothing changed: a re-run edits nothing, asks the judge nothing and gives the same report
    with OpenAIServer(handler=judge_reply) as srv:
        again = CliRunner().invoke(cli, [
            "eval", "tiny", str(model), "--suite", "magicbrush", "--suite", "gedit-bench",
            "--suite-data", f"magicbrush={mb}", "--suite-data", f"gedit-bench={ge}",
            "--judge-model", "judge-x", "--judge-base-url", srv.base_url, "--out", str(out),
            "--json", *TINY])
        assert again.exit_code == 0, again.output
        assert srv.chat_requests == []
    res2 = json.loads(again.stdout)
    assert res2["edited"] == {"tiny": 0, str(model): 0}
    for name in ("magicbrush", "gedit-bench"):
        for m in res["models"]:
            assert res2["suites"][name]["models"][m]["metrics"] == \
                res["suites"][name]["models"][m]["metrics"]


def test_judged_suite_without_a_judge_and_bad_names_are_one_line(tmp_path, capsys):
    ge = gedit_folder(tmp_path / "gedit")
    o = str(tmp_path / "o")
    code, cap = dsbuild(["eval", "tiny", "--suite", "gedit-bench", "--suite-data",
                         f"gedit-bench={ge}", "--out", o, *TINY], capsys)
    (line,) = error_lines(cap.err)
    assert code == 2 and "--judge-model" in line and "--judge-base-url" in line
    code, cap = dsbuild(["eval", "tiny", "--suite", "magicbrush", "--suite-data",
                         f"magicbush={tmp_path}", "--out", o, *TINY], capsys)
    (line,) = error_lines(cap.err)
    assert code == 2 and "NAME=VALUE" in line and "magicbrush" in line
    code, cap = dsbuild(["eval", "tiny", "--suite", "export", "--out", o, *TINY], capsys)
    (line,) = error_lines(cap.err)
    assert code == 2 and "--data" in line
    code, cap = dsbuild(["eval", "tiny", "--suite", "magicbrush", "--suite-data",
                         f"magicbrush={tmp_path / 'nowhere'}", "--out", o, *TINY], capsys)
    (line,) = error_lines(cap.err)
    assert code == 2 and "nowhere" in line
    assert not (tmp_path / "o").exists()


def _edits(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))
            if "magicbrush" in p.parts}


def test_kill_mid_suite_and_resume(tmp_path, one_torch_thread):
    from dsbuild.evaluate.settings import EvalSettings
    from dsbuild.evaluate.suites.run import run_suites

    mb = magicbrush_test_folder(tmp_path / "magicbrush")
    s = EvalSettings(steps=2, batch_size=1, suite_resolution=32, suite_clip_model="tiny",
                     suite_dino_model="tiny")
    ref = run_suites(["tiny"], ["magicbrush"], tmp_path / "ref", s,
                     sources={"magicbrush": str(mb)})
    assert ref["edited"] == {"tiny": 4}  # 3 single-turn edits, turn 2 of the chain

    out = tmp_path / "ev"
    paused = tmp_path / "paused.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DSBUILD_NO_PROGRESS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               DSBUILD_PAUSE_AT=f"magicbrush/edits:2:{paused}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsbuild", "eval", "tiny", "--suite", "magicbrush",
         "--suite-data", f"magicbrush={mb}", "--batch-size", "1", "--out", str(out), *TINY],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not paused.exists():
        time.sleep(0.05)  # waits for the event (the pause file), races nothing
    assert paused.exists(), proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_edits(out)) == 2 and not (out / "report.json").exists()

    again = run_suites(["tiny"], ["magicbrush"], out, s, sources={"magicbrush": str(mb)})
    assert again["edited"] == {"tiny": 2}  # only what the killed run had not written
    assert again["suites"]["magicbrush"]["models"]["tiny"]["metrics"] == \
        ref["suites"]["magicbrush"]["models"]["tiny"]["metrics"]
    got, want = _edits(out), _edits(tmp_path / "ref")
    assert {Path(k).name for k in got} == {Path(k).name for k in want}
    assert sorted(got.values()) == sorted(want.values())  # the same pixels
