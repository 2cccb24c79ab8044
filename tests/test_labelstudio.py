"""Label Studio review against a real Label Studio server (its own venv, 127.0.0.1, temp data).

The server is started once per test session; without its venv (``bash .ci/install --test``
creates it) the server tests skip. Reviewers annotate through the API, as the UI does.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from builders import make_build, make_judged_build
from click.testing import CliRunner

from dsbuild.cli import cli
from dsbuild.core.decisions import latest_by_pair, read_decisions
from dsbuild.core.errors import DsbuildError
from dsbuild.review import labelstudio as ls

TOKEN = "dsbuild-test-token-0123456789"
ADMIN = "admin@example.com"
CACHE = Path("~/.cache/dsbuild-test").expanduser()
LS_VENV = Path(os.environ.get("DSBUILD_LABEL_STUDIO_VENV", str(CACHE / "ls-venv"))).expanduser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, root: Path, log: Path):
        self.url, self.root, self.log = url, root, log

    def client(self):
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=TOKEN)


def _ls_version() -> str:
    found = sorted(LS_VENV.glob("lib/python*/site-packages/label_studio-*.dist-info"))
    return found[-1].name.removesuffix(".dist-info").split("-", 1)[1] if found else "unknown"


def _start(exe: Path, env: dict, root: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [str(exe), "start", "--internal-host", "127.0.0.1", "--port", str(port),
             "--no-browser"], env=env, cwd=root, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True)


def _wait(proc: subprocess.Popen, url: str, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"Label Studio exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(f"{url}/api/current-user/whoami",
                          headers={"Authorization": f"Token {TOKEN}"}, timeout=5)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            pytest.fail(f"Label Studio did not start in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """End the server's whole process group (it was started in its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _save_template(data: Path, template: Path) -> None:
    """Keep the freshly migrated data folder (an online SQLite backup) for later sessions."""
    tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(data, tmp, ignore=shutil.ignore_patterns("*.sqlite3*"))
    src = sqlite3.connect(data / "label_studio.sqlite3")
    dst = sqlite3.connect(tmp / "label_studio.sqlite3")
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    try:
        os.replace(tmp, template)
    except OSError:  # another session made it first
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory):
    """A Label Studio server on a free 127.0.0.1 port; local files served from its temp root.

    A fresh data folder costs a minute of database migrations, so the first session keeps a
    migrated copy (per Label Studio version) in ~/.cache/dsbuild-test and later sessions
    start from a copy of it in seconds.
    """
    exe = LS_VENV / "bin" / "label-studio"
    if not exe.exists():
        pytest.skip(f"Label Studio server not found at {exe}; run `bash .ci/install --test` "
                    "(or set DSBUILD_LABEL_STUDIO_VENV)")
    root = tmp_path_factory.mktemp("labelstudio")
    data = root / "data"
    template = CACHE / f"ls-data-{_ls_version()}"
    if (template / "label_studio.sqlite3").exists():
        shutil.copytree(template, data)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k != "HOST" and not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "LABEL_STUDIO_USERNAME": ADMIN, "LABEL_STUDIO_PASSWORD": "admin-pass-123",
        "LABEL_STUDIO_USER_TOKEN": TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        # stay offline: no version check, analytics or error reporting
        "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
    })
    log = root / "server.log"
    url = f"http://127.0.0.1:{port}"
    proc = _start(exe, env, root, port, log)
    try:
        _wait(proc, url, log)
        if not template.exists():
            _save_template(data, template)
        yield Server(url, root, log)
    finally:
        _stop(proc)


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(ls.TOKEN_ENV, TOKEN)
    monkeypatch.delenv(ls.URL_ENV, raising=False)
    return TOKEN


@pytest.fixture(scope="session")
def reviewers(ls_server):
    """Two more reviewers (users of the same organisation) besides the admin."""
    client = ls_server.client()
    users = {}
    for name in ("rev2", "rev3"):
        u = client.users.create(username=name, email=f"{name}@example.com",
                                password=f"{name}-pass-123")
        users[name] = u
    return users


def annotate(client, task_id: int, verdict: str, *, user: int | None = None,
             reasons=(), fix: str | None = None, quality: int | None = None,
             cancelled: bool = False):
    """What the review screen sends on Submit (or Skip)."""
    result = [{"from_name": "verdict", "to_name": "edit", "type": "choices",
               "value": {"choices": [verdict]}}]
    if reasons:
        result.append({"from_name": "reason", "to_name": "edit", "type": "choices",
                       "value": {"choices": list(reasons)}})
    if fix:
        result.append({"from_name": "corrected_edit", "to_name": "edit", "type": "textarea",
                       "value": {"text": [fix]}})
    if quality:
        result.append({"from_name": "quality", "to_name": "output_image", "type": "rating",
                       "value": {"rating": quality}})
    kwargs = {"completed_by": user} if user else {}
    return client.annotations.create(task_id, result=[] if cancelled else result,
                                     was_cancelled=cancelled, **kwargs)


def tasks_by_pair(client, project_id: int) -> dict[str, object]:
    return {t.data["pair_id"]: t for t in client.tasks.list(project=project_id, page_size=100)}


def run_cli(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=True)
    return result


# ------------------------------------------------------------------ no server needed
def test_sampling_is_stratified_deterministic_and_nested(mini_build):
    make_build(mini_build)  # 18 pairs, 9 kept: chairs 5, living-room 4
    kept = ls.select_pairs(mini_build)
    assert len(kept) == 9
    six = ls.select_pairs(mini_build, sample_size=6, seed=1)
    assert [r["pair_id"] for r in six] == \
        [r["pair_id"] for r in ls.select_pairs(mini_build, sample_size=6, seed=1)]
    agents = sorted(r["agent"] for r in six)
    assert agents.count("chairs") == 3 and agents.count("living-room") == 3
    samples = [{r["pair_id"] for r in ls.select_pairs(mini_build, sample_size=n, seed=1)}
               for n in range(1, 10)]
    assert all(len(a) + 1 == len(b) and a < b for a, b in itertools.pairwise(samples))
    other = {r["pair_id"] for r in ls.select_pairs(mini_build, sample_size=6, seed=2)}
    assert other != {r["pair_id"] for r in six}
    assert len(ls.select_pairs(mini_build, policy="all")) == 18
    assert len(ls.select_pairs(mini_build, sample_size=4, policy="all")) == 4


def queue_build(build) -> dict:
    """A judged build (pico-banana, threshold 0.7) of 9 kept pairs: verify rejects kept pairs
    0 and 2, pair 1's judge score sits at the threshold, pair 3's is missing, pair 4 has a
    curator's correction, pair 5 a re-caption."""
    build.update(["verify.judge.rubric=pico-banana"])
    at = dict.fromkeys(build.config.verify.judge.resolved().names, 7)  # 0.70
    return make_judged_build(build, judge={1: at, 3: None}, reject={0, 2},
                             recaption={5: "add a blue rug"},
                             decisions={4: ("accept", "fiftyone", "make the chair teal")})


def test_the_review_queue_holds_headed_pairs_most_valuable_first(mini_build):
    out = queue_build(mini_build)
    k = out["kept"]
    queue = ls.select_pairs(mini_build)
    ids = [r["pair_id"] for r in queue]
    assert set(ids) == set(k) - {k[0], k[2]}  # no verify reject
    assert ids[0] == k[1] and ids[-1] == k[4]  # at the threshold first, the reviewed one last
    assert ids.index(k[3]) == len(ids) - 2  # a missing score ranks under a confident one
    prio = [r["review_priority"] for r in queue]
    assert prio == sorted(prio, reverse=True)
    ties = [r["pair_id"] for r in queue if r["review_priority"] == queue[1]["review_priority"]]
    assert ties == sorted(ties) and len(ties) == 4  # pair id breaks ties
    everything = ls.select_pairs(mini_build, queue="all")
    assert [r["pair_id"] for r in everything] == sorted(k)
    mini_build.update(["review.queue=all"])
    assert [r["pair_id"] for r in ls.select_pairs(mini_build)] == sorted(k)
    mini_build.update(["review.queue=export"])
    # a sample is drawn within the queue, stratified as before, and keeps the queue's order
    three = ls.select_pairs(mini_build, sample_size=3, seed=1)
    assert {r["pair_id"] for r in three} <= set(ids) and len(three) == 3
    assert [r["pair_id"] for r in three] == [i for i in ids if i in {r["pair_id"] for r in three}]
    with pytest.raises(DsbuildError, match="queue must be"):
        ls.select_pairs(mini_build, queue="later")
    # the task shows the instruction in force, the re-caption under it, the queue's columns
    rows = {r["pair_id"]: r for r in queue}
    urls = {"input": "/i", "output": "/o"}
    fixed = ls.task_data(rows[k[4]], urls)
    assert fixed["edit_prompt"] == "make the chair teal" and fixed["edit_note"] == ""
    rc = ls.task_data(rows[k[5]], urls)
    assert rc["edit_prompt"] == rows[k[5]]["edit_prompt_generated"]
    assert rc["edit_note"] == "re-captioned: \u201cadd a blue rug\u201d"
    assert fixed["review_priority"] == rows[k[4]]["review_priority"]
    assert rc["judge_score"] == pytest.approx(0.8)
    mini_build.update(["export.edit_prompt=recaptioned"])
    row5 = next(r for r in ls.select_pairs(mini_build) if r["pair_id"] == k[5])
    shown = ls.task_data(row5, urls)
    assert (shown["edit_prompt"], shown["edit_note"]) == ("add a blue rug", "")


def test_majority_agreement_and_ties():
    def review(who, verdict, at, **kw):
        return {"reviewer": who, "verdict": verdict, "reasons": kw.get("reasons", []),
                "corrected_edit": kw.get("fix"), "quality": kw.get("quality"), "at": at}

    d = ls.aggregate("p", [review("a", "accept", "2026-01-01T00:00:00Z"),
                           review("b", "reject", "2026-01-02T00:00:00Z",
                                  reasons=["artefacts"], fix="make it teal")])
    assert (d["verdict"], d["tie"], d["agreement"], d["reason"]) == \
        ("reject", True, 0.0, "artefacts")
    assert d["corrected_edit"] == "make it teal" and d["reviewer"] == "a,b"
    assert d["at"] == "2026-01-02T00:00:00Z" and d["tool"] == "labelstudio"
    d = ls.aggregate("p", [review("a", "accept", "1"), review("b", "accept", "2"),
                           review("c", "reject", "3")])
    assert (d["verdict"], d["tie"]) == ("accept", False)
    assert d["agreement"] == pytest.approx(1 / 3)
    # a reviewer's later answer replaces the earlier one
    d = ls.aggregate("p", [review("a", "reject", "1"), review("a", "accept", "2")])
    assert (d["verdict"], d["annotators"], d["agreement"]) == ("accept", 1, None)
    assert ls.pairwise_agreement(["accept"] * 3) == 1.0


def test_no_token_and_no_push_are_clear_errors(mini_build, monkeypatch):
    make_build(mini_build)
    monkeypatch.delenv(ls.TOKEN_ENV, raising=False)
    with pytest.raises(DsbuildError, match="LABEL_STUDIO_API_KEY"):
        ls.push(mini_build, "http://127.0.0.1:9")
    monkeypatch.setenv(ls.TOKEN_ENV, "x")
    with pytest.raises(DsbuildError, match="run `dsbuild review push` first"):
        ls.pull(mini_build, "http://127.0.0.1:9")
    assert not (mini_build.root / "review").exists()


# ------------------------------------------------------------------ real server
@pytest.mark.server
def test_label_studio_accepts_the_configs_and_refuses_a_broken_one(ls_server):
    client = ls_server.client()
    for cfg in sorted(ls.CONFIG_DIR.glob("*.xml")):
        p = client.projects.create(title=f"config {cfg.stem}", label_config=cfg.read_text())
        names = client.projects.get(p.id).get_label_interface().controls
        assert names, cfg
        client.projects.delete(p.id)
    pair = (ls.CONFIG_DIR / "pair_review.xml").read_text()
    p = client.projects.create(title="config check", label_config=pair)
    li = client.projects.get(p.id).get_label_interface()
    controls = {c.name for c in li.controls}
    assert {"verdict", "reason", "corrected_edit", "quality"} <= controls
    assert set(li.get_control("reason").labels) == set(ls.REASONS)
    assert {o.name for o in li.objects} >= {"input_image", "output_image", "edit",
                                             "input_caption", "output_caption"}
    client.projects.delete(p.id)
    broken = pair.replace('toName="edit" choice="single-radio"', 'toName="nowhere" '
                          'choice="single-radio"')
    with pytest.raises(Exception, match="nowhere"):
        client.projects.create(title="broken", label_config=broken)


@pytest.mark.server
def test_push_annotate_pull_round_trip(ls_server, reviewers, mini_build, token):
    make_build(mini_build)
    url, title = ls_server.url, "round trip"
    res = run_cli("review", "push", str(mini_build.root), "--url", url, "--project", title,
                  "--sample", "6")
    assert res.exit_code == 0, res.output
    assert "6 imported, 0 already there" in res.output
    state = json.loads((mini_build.root / "review" / "labelstudio.json").read_text())
    assert state["url"] == url and state["title"] == title and TOKEN not in json.dumps(state)
    client = ls_server.client()
    tasks = tasks_by_pair(client, state["project_id"])
    assert set(tasks) == {r["pair_id"] for r in ls.select_pairs(mini_build, sample_size=6)}
    # images are reachable by a logged-in browser and are the build's files
    pairs = {p["id"]: p for p in mini_build.records("generate")}
    for pid, t in list(tasks.items())[:2]:
        for side, key in (("input", "input_image"), ("output", "edited_image")):
            r = httpx.get(url + t.data[key], headers={"Authorization": f"Token {TOKEN}"})
            assert r.status_code == 200
            assert r.content == (mini_build.root / pairs[pid]["images"][side]).read_bytes()
        assert t.data["edit_prompt"] and t.data["original_prompt"] and t.data["agent"]

    # re-push: nothing new; a larger sample adds only the missing pairs, no image twice
    again = ls.push(mini_build, url, title=title, sample_size=6)
    assert (again["imported"], again["already_there"]) == (0, 6)
    uploads = len(client.files.list(state["media_project_id"], all_=True))
    full = ls.push(mini_build, title=title)
    assert (full["selected"], full["imported"], full["already_there"]) == (9, 3, 6)
    assert len(client.files.list(state["media_project_id"], all_=True)) == uploads + 6
    tasks = tasks_by_pair(client, state["project_id"])
    assert len(tasks) == 9

    rev2, rev3 = reviewers["rev2"].id, reviewers["rev3"].id
    ids = sorted(tasks)
    a, b, c, d, e = (tasks[i].id for i in ids[:5])
    annotate(client, a, "accept")
    annotate(client, a, "reject", user=rev2, reasons=["unwanted_change", "artefacts"],
             fix="make the armchair teal", quality=2)
    annotate(client, b, "accept", quality=5)
    annotate(client, b, "accept", user=rev2, quality=4)
    c_annotation = annotate(client, c, "accept")
    annotate(client, d, "reject", reasons=["artefacts"], quality=1)
    annotate(client, e, "accept", cancelled=True)  # skipped: stays pending

    res = run_cli("review", "pull", str(mini_build.root))
    assert res.exit_code == 0, res.output
    decisions = read_decisions(mini_build)
    assert len(decisions) == 4
    by_pair = {x["pair_id"]: x for x in decisions}
    da, db, dc, dd = (by_pair[i] for i in ids[:4])
    assert ids[4] not in by_pair
    assert all(x["tool"] == "labelstudio" for x in decisions)
    assert (da["verdict"], da["tie"], da["agreement"], da["votes"]) == \
        ("reject", True, 0.0, {"accept": 1, "reject": 1})
    assert da["reviewer"] == f"{ADMIN},rev2@example.com"
    assert da["corrected_edit"] == "make the armchair teal"
    assert da["reason"] == "unwanted_change"  # one vote each: the order of REASONS decides
    assert da["reasons"] == {"unwanted_change": 1, "artefacts": 1}
    assert (db["verdict"], db["agreement"], db["quality"]) == ("accept", 1.0, 4.5)
    assert (dc["verdict"], dc["agreement"], dc["reviewer"]) == ("accept", None, ADMIN)
    assert (dd["verdict"], dd["reason"], dd["quality"]) == ("reject", "artefacts", 1)
    report = json.loads((mini_build.reports_dir / "labelstudio.json").read_text())
    assert report["agreement"] == 0.5 and report["done"] == 4 and report["pending"] == 5
    assert report["pairs"][ids[0]]["tie"] is True
    assert (mini_build.reports_dir / "labelstudio.png").stat().st_size > 1000

    # pulling twice adds nothing
    before = mini_build.decisions_path.read_bytes()
    assert ls.pull(mini_build)["added"] == 0
    assert mini_build.decisions_path.read_bytes() == before

    # a third reviewer breaks the tie: one new decision, and it is the latest for the pair
    third = annotate(client, a, "reject", user=rev3, reasons=["unwanted_change"])
    assert ls.pull(mini_build)["added"] == 1
    latest = latest_by_pair(mini_build, tool="labelstudio")[ids[0]]
    assert (latest["verdict"], latest["tie"], latest["annotators"]) == ("reject", False, 3)
    assert latest["agreement"] == pytest.approx(1 / 3)
    assert latest["reason"] == "unwanted_change"

    res = run_cli("review", "status", str(mini_build.root), "--json")
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert (st["tasks"], st["done"], st["pending"], st["accept"], st["reject"]) == \
        (9, 4, 5, 2, 2)
    assert sum(s["tasks"] for s in st["per_agent"].values()) == 9
    assert set(st["per_agent"]) == {"chairs", "living-room"}
    text = run_cli("review", "status", str(mini_build.root)).output
    assert "chairs" in text and "pending" in text

    # an annotation deleted in Label Studio: the re-pulled aggregate is in force again, though
    # its time (the remaining annotations') is older than the decision it replaces
    client.annotations.delete(third.id)
    assert ls.pull(mini_build)["added"] == 1
    latest = latest_by_pair(mini_build, tool="labelstudio")[ids[0]]
    assert (latest["verdict"], latest["tie"], latest["annotators"]) == ("reject", True, 2)
    # every annotation of a task deleted: its decision is withdrawn, once
    client.annotations.delete(c_annotation.id)
    res = ls.pull(mini_build)
    assert (res["added"], res["withdrawn"]) == (1, 1)
    assert ids[2] not in latest_by_pair(mini_build) and ls.pull(mini_build)["added"] == 0
    assert mini_build.status()["decisions"] == {"labelstudio:accept": 1,
                                                "labelstudio:reject": 2}


@pytest.mark.server
def test_push_sends_the_review_queue_in_order_and_all_pairs_on_request(ls_server, mini_build,
                                                                        token):
    out = queue_build(mini_build)
    k = out["kept"]
    res = run_cli("review", "push", str(mini_build.root), "--url", ls_server.url, "--project",
                  "queue")
    assert res.exit_code == 0, res.output
    assert "7 pairs selected, 7 imported" in res.output
    client = ls_server.client()
    pid = json.loads((mini_build.root / "review" / "labelstudio.json").read_text())["project_id"]
    tasks = sorted(client.tasks.list(project=pid, page_size=100), key=lambda t: t.id)
    order = [t.data["pair_id"] for t in tasks]
    assert order == [r["pair_id"] for r in ls.select_pairs(mini_build)]  # priority order
    assert k[0] not in order and k[2] not in order and order[0] == k[1]
    prio = [t.data["review_priority"] for t in tasks]
    assert prio == sorted(prio, reverse=True)
    data = {t.data["pair_id"]: t.data for t in tasks}
    assert data[k[4]]["edit_prompt"] == "make the chair teal"  # the correction shows
    assert data[k[5]]["edit_note"] == "re-captioned: \u201cadd a blue rug\u201d"
    assert data[k[1]]["judge_score"] == pytest.approx(0.7) and data[k[3]]["judge_score"] is None
    # --all-pairs: the verify rejects too, in pair id order
    res = run_cli("review", "push", str(mini_build.root), "--project", "queue all",
                  "--all-pairs")
    assert res.exit_code == 0, res.output
    pid = json.loads((mini_build.root / "review" / "labelstudio.json").read_text())["project_id"]
    tasks = sorted(client.tasks.list(project=pid, page_size=100), key=lambda t: t.id)
    assert [t.data["pair_id"] for t in tasks] == sorted(k)


def _task_json(url: str, task_id: int) -> dict:
    r = httpx.get(f"{url}/api/tasks/{task_id}", headers={"Authorization": f"Token {TOKEN}"})
    r.raise_for_status()
    return r.json()


@pytest.mark.server
def test_push_sets_the_overlap_and_reviewers_join_by_invite(ls_server, reviewers, mini_build,
                                                            token):
    """`--overlap N` sets the project's annotations per task (a task is labeled once N
    reviewers answered it); reviewers join through the invite link as docs/ say."""
    make_build(mini_build)
    url, client = ls_server.url, ls_server.client()
    res = run_cli("review", "push", str(mini_build.root), "--url", url, "--project", "overlap",
                  "--sample", "3", "--overlap", "2")
    assert res.exit_code == 0, res.output
    assert "(images: upload; 2 reviewers per pair)" in res.output
    pid = json.loads((mini_build.root / "review" / "labelstudio.json").read_text())["project_id"]
    project = client.projects.get(pid)
    assert (project.maximum_annotations, project.overlap_cohort_percentage) == (2, 100)
    tasks = tasks_by_pair(client, pid)
    assert {_task_json(url, t.id)["overlap"] for t in tasks.values()} == {2}
    first = next(iter(tasks.values()))
    annotate(client, first.id, "accept")
    assert _task_json(url, first.id)["is_labeled"] is False  # one of two reviewers
    annotate(client, first.id, "reject", user=reviewers["rev2"].id, reasons=["artefacts"])
    assert _task_json(url, first.id)["is_labeled"] is True
    # a push without --overlap keeps the project's; a new N applies to old and new tasks
    assert ls.push(mini_build, url, sample_size=3)["overlap"] == 2
    res = ls.push(mini_build, url, sample_size=4, overlap=3)
    assert (res["overlap"], res["imported"]) == (3, 1)
    assert {_task_json(url, t.id)["overlap"]
            for t in tasks_by_pair(client, pid).values()} == {3}
    mini_build.update(["review.overlap=1"])  # the setting, when --overlap is not given
    assert ls.push(mini_build, url)["overlap"] == client.projects.get(pid).maximum_annotations == 1

    # a reviewer signs up through the organisation's invite link and can log in
    invite = client.organizations.invites.get_invite_link().invite_url
    assert invite.startswith("/user/signup/?token=")
    with httpx.Client(base_url=url) as s:
        s.get(invite)
        r = s.post(invite, data={"csrfmiddlewaretoken": s.cookies["csrftoken"],
                                 "email": "invited@example.com", "password": "invited-pass-123"},
                   headers={"Referer": url + invite})
        assert r.status_code in (200, 302), r.text[:300]
    assert "invited@example.com" in {u.email for u in client.users.list()}
    assert "sessionid" in login_cookies(url, "invited@example.com", "invited-pass-123")


@pytest.mark.server
def test_local_files_mode(ls_server, mini_build_under_root, token):
    build = mini_build_under_root
    make_build(build)
    res = ls.push(build, ls_server.url, title="local files", images="local-files",
                  document_root=str(ls_server.root))
    assert res["imported"] == 9
    client = ls_server.client()
    assert len(client.import_storage.local.list(project=res["project_id"])) == 1
    pairs = {p["id"]: p for p in build.records("generate")}
    for pid, t in list(tasks_by_pair(client, res["project_id"]).items())[:2]:
        assert t.data["input_image"].startswith("/data/local-files/?d=")
        r = httpx.get(ls_server.url + t.data["edited_image"],
                      headers={"Authorization": f"Token {TOKEN}"})
        assert r.status_code == 200
        assert r.content == (build.root / pairs[pid]["images"]["output"]).read_bytes()
    assert ls.push(build, images="local-files", document_root=str(ls_server.root))[
        "imported"] == 0
    assert len(client.import_storage.local.list(project=res["project_id"])) == 1
    outside = Path("/nonexistent-docroot")
    with pytest.raises(DsbuildError, match="not under the document root"):
        ls.push(build, ls_server.url, title="local files 2", images="local-files",
                document_root=str(outside))


@pytest.fixture
def mini_build_under_root(ls_server, mini_recipe, request):
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe

    root = ls_server.root / "builds" / request.node.name
    return Build.init(root, load_recipe(mini_recipe), recipe_path=str(mini_recipe))


def _nothing_written(build) -> bool:
    return not (build.root / "review").exists() and not build.decisions_path.exists() \
        and not build.reports_dir.exists()


@pytest.mark.server
def test_error_paths_write_nothing(ls_server, mini_build, token, monkeypatch, capsys):
    make_build(mini_build)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DsbuildError, match="cannot reach Label Studio"):
        ls.push(mini_build, dead)
    monkeypatch.setenv(ls.TOKEN_ENV, "not-the-token")
    with pytest.raises(DsbuildError, match="refused the API token"):
        ls.push(mini_build, ls_server.url)
    # the CLI prints the message without a traceback and exits 2
    from dsbuild.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["review", "push", str(mini_build.root), "--url", ls_server.url])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "refused the API token" in err and "Traceback" not in err
    assert _nothing_written(mini_build)

    # the project is deleted on the server after a push
    monkeypatch.setenv(ls.TOKEN_ENV, TOKEN)
    res = ls.push(mini_build, ls_server.url, title="deleted later", sample_size=2)
    client = ls_server.client()
    client.projects.delete(res["project_id"])
    state_before = (mini_build.root / "review" / "labelstudio.json").read_bytes()
    for call in (ls.pull, ls.status, ls.push):
        with pytest.raises(DsbuildError, match="no longer exists"):
            call(mini_build)
    assert not mini_build.decisions_path.exists() and not mini_build.reports_dir.exists()
    assert (mini_build.root / "review" / "labelstudio.json").read_bytes() == state_before
    # ... and the server going away between push and pull
    monkeypatch.setenv(ls.URL_ENV, dead)
    with pytest.raises(DsbuildError, match="cannot reach"):
        ls.pull(mini_build, dead)
    assert not mini_build.decisions_path.exists()
    again = ls.push(mini_build, title="deleted later", sample_size=2, recreate=True)
    assert again["project_id"] != res["project_id"] and again["imported"] == 2


@pytest.mark.server
def test_recreate_makes_a_new_project_and_keeps_pulled_decisions(ls_server, mini_build, token):
    make_build(mini_build)
    first = ls.push(mini_build, ls_server.url, title="recreate", sample_size=2)
    client = ls_server.client()
    tasks = tasks_by_pair(client, first["project_id"])
    pid = min(tasks)
    annotate(client, tasks[pid].id, "accept")
    assert ls.pull(mini_build)["added"] == 1
    state = json.loads((mini_build.root / "review" / "labelstudio.json").read_text())
    uploads = len(client.files.list(state["media_project_id"], all_=True))

    res = run_cli("review", "push", str(mini_build.root), "--recreate", "--sample", "2")
    assert res.exit_code == 0, res.output
    state = json.loads((mini_build.root / "review" / "labelstudio.json").read_text())
    second = state["project_id"]
    assert second != first["project_id"] and f"project {second} " in res.output
    assert set(tasks_by_pair(client, second)) == set(tasks)
    # the old project is left as it was; the images uploaded before are reused
    assert client.tasks.get(str(tasks[pid].id)).annotations
    assert len(client.files.list(state["media_project_id"], all_=True)) == uploads
    # the new project has no annotations yet: pulling it keeps the decision from the old one
    assert ls.pull(mini_build)["added"] == 0
    assert latest_by_pair(mini_build, tool="labelstudio")[pid]["verdict"] == "accept"
    # later pushes and pulls go to the new project
    assert ls.push(mini_build, sample_size=2)["project_id"] == second
    new_tasks = tasks_by_pair(client, second)
    annotate(client, new_tasks[pid].id, "reject", reasons=["artefacts"])
    assert ls.pull(mini_build)["added"] == 1
    assert latest_by_pair(mini_build, tool="labelstudio")[pid]["verdict"] == "reject"


# ------------------------------------------------------------------ the review screen in a browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3/4, NUL-framed)."""

    def __init__(self, profile: Path, size=(1400, 1180)):
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        os.set_inheritable(to_child_r, True)
        os.set_inheritable(from_child_w, True)
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                "--remote-debugging-pipe", f"--window-size={size[0]},{size[1]}",
                "--hide-scrollbars", "about:blank"]

        def fds():
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(args, preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf, self._id, self.session = b"", 0, None

    def send(self, method: str, session: bool = True, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, cookies: dict[str, str], origin: str) -> None:
        target = self.send("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", session=False, targetId=target,
                                 flatten=True)["sessionId"]
        for name, value in cookies.items():
            self.send("Network.setCookie", name=name, value=value, url=origin)
        self.send("Page.navigate", url=url)

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while not self.js(expression):
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.5)

    def close(self) -> None:
        for fd in (self._r, self._w):
            os.close(fd)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def login_cookies(url: str, email: str, password: str) -> dict[str, str]:
    """Log in through Label Studio's login form, as a browser does; returns its cookies."""
    with httpx.Client(base_url=url) as s:
        s.get("/user/login/")
        s.post("/user/login/", data={"csrfmiddlewaretoken": s.cookies["csrftoken"],
                                     "email": email, "password": password},
               headers={"Referer": f"{url}/user/login/"})
        assert "sessionid" in s.cookies, "login failed"
        return dict(s.cookies)


# Tick a visible choice: true once it is checked, else click it (the form renders async).
LABEL = ("(() => {{ const l = [...document.querySelectorAll('label')].find(x =>"
         " x.offsetParent !== null && x.textContent.trim().startsWith({!r}));"
         " const i = l && l.querySelector('input'); if (!i) return false;"
         " if (i.checked) return true; l.click(); return false; }})()")


@pytest.mark.server
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium; `bash .ci/install --test` does it)")
def test_reviewer_submits_in_the_browser(ls_server, mini_build, token, tmp_path):
    """The config renders in a real browser; what its Submit sends is what pull reads."""
    make_build(mini_build)
    res = ls.push(mini_build, ls_server.url, title="browser", sample_size=1)
    client = ls_server.client()
    (pid, task), = tasks_by_pair(client, res["project_id"]).items()
    cookies = login_cookies(ls_server.url, ADMIN, "admin-pass-123")
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(f"{ls_server.url}/projects/{res['project_id']}/data?task={task.id}",
                     cookies, ls_server.url)
        # both images loaded from Label Studio's media folder
        browser.wait_for("[...document.images].filter(i => i.src.includes('/data/upload/')"
                         " && i.complete && i.naturalWidth > 0).length >= 2")
        edit = json.dumps(task.data["edit_prompt"])
        assert browser.js(f"document.body.innerText.includes({edit})")
        assert not browser.js(LABEL.format("artefacts"))  # reasons show only for reject
        browser.wait_for(LABEL.format("reject"), timeout=20)
        browser.wait_for(LABEL.format("artefacts"), timeout=10)
        browser.wait_for(LABEL.format("unwanted change"), timeout=10)
        browser.js("document.querySelector('textarea').focus()")
        browser.send("Input.insertText", text="make the armchair teal")
        shot = browser.send("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "review.png").write_bytes(base64.b64decode(shot))
        assert browser.js("(() => { const b = [...document.querySelectorAll('button')]"
                          ".find(x => x.textContent.trim() === 'Submit');"
                          " if (b) b.click(); return !!b; })()")
        deadline = time.time() + 30
        while not client.tasks.get(str(task.id)).annotations:
            if time.time() > deadline:
                shot = browser.send("Page.captureScreenshot", format="png")["data"]
                (tmp_path / "after-submit.png").write_bytes(base64.b64decode(shot))
                raise AssertionError(f"the annotation never reached the server; see "
                                     f"{tmp_path / 'after-submit.png'}")
            time.sleep(0.5)
    finally:
        browser.close()
    assert (tmp_path / "review.png").stat().st_size > 20_000
    assert ls.pull(mini_build)["added"] == 1
    (d,) = read_decisions(mini_build)
    assert (d["pair_id"], d["verdict"], d["reviewer"]) == (pid, "reject", ADMIN)
    assert d["reasons"] == {"unwanted_change": 1, "artefacts": 1}
    assert d["corrected_edit"] == "make the armchair teal"


@pytest.mark.server
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                    "(apt-get install chromium; `bash .ci/install --test` does it)")
def test_the_instruction_stays_in_view_while_picking_reasons(ls_server, mini_build, token,
                                                              tmp_path):
    """On a short screen the review form scrolls; the instruction stays at the top."""
    make_build(mini_build)
    res = ls.push(mini_build, ls_server.url, title="sticky", sample_size=1)
    client = ls_server.client()
    (pid, task), = tasks_by_pair(client, res["project_id"]).items()
    cookies = login_cookies(ls_server.url, ADMIN, "admin-pass-123")
    browser = Chromium(tmp_path / "profile", size=(1200, 640))
    try:
        browser.open(f"{ls_server.url}/projects/{res['project_id']}/data?task={task.id}",
                     cookies, ls_server.url)
        browser.wait_for("[...document.images].filter(i => i.src.includes('/data/upload/')"
                         " && i.complete && i.naturalWidth > 0).length >= 2")
        browser.wait_for(LABEL.format("reject"), timeout=20)
        for reason in ("artefacts", "instruction unclear"):
            browser.wait_for(LABEL.format(reason), timeout=10)
        # scroll the form to its end (the corrected instruction), as a reviewer does
        seen = browser.js("""(() => {
          const e = document.querySelector('.dsb-edit');
          let box = e.parentElement;
          while (box && !(['auto', 'scroll'].includes(getComputedStyle(box).overflowY)
                          && box.scrollHeight > box.clientHeight)) box = box.parentElement;
          if (!box) return {scrolls: false};
          box.scrollTop = box.scrollHeight;
          const r = e.getBoundingClientRect(), b = box.getBoundingClientRect();
          const img = document.querySelector('.dsb-pair').getBoundingClientRect();
          const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
          return {scrolls: box.scrollTop > 0, image_gone: img.bottom <= r.bottom,
                  inside: r.top >= b.top - 1 && r.bottom <= b.bottom + 1,
                  on_top: e.contains(hit), text: e.innerText};
        })()""")
        shot = browser.send("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "scrolled.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    # the form did scroll (the two images went under the instruction), and the instruction is
    # still at the top of it, drawn above what scrolls by
    assert seen["scrolls"] and seen["image_gone"], seen
    assert seen["inside"] and seen["on_top"], seen
    assert task.data["edit_prompt"] in seen["text"]
