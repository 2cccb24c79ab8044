"""Human review in Label Studio: push pairs as tasks, pull annotations back as decisions.

``push`` creates (or reuses, by title) a project with ``label_config/pair_review.xml`` and
imports one task per pair chosen by a policy (kept by filter, a sample size stratified by
agent, deterministic by seed). It imports only pairs whose ``pair_id`` is not already in a
task, so pushing twice adds nothing. ``pull`` turns the annotations into one decision per
pair (tool ``labelstudio``): the majority verdict of its annotators, their agreement, the
reasons and a corrected instruction. ``status`` counts done/pending/agreement per agent.

Images reach the reviewer's browser in one of two ways (``images``):

- ``upload`` (default): the PNGs are uploaded into Label Studio's media folder, attached to a
  companion project ``<title> · images`` (Label Studio parses files uploaded to a project
  against its label config, and a config with two images cannot take raw files). Works with
  any server, local or remote; costs a copy of every image on the server.
- ``local-files``: tasks point at ``/data/local-files/?d=...`` and the project gets a Local
  Storage connection rooted at the build. No copy, but the server must run on the machine
  that holds the build, with ``LOCAL_FILES_SERVING_ENABLED=true`` and
  ``LOCAL_FILES_DOCUMENT_ROOT`` a parent folder of the build.

The project id lives in ``<build>/review/labelstudio.json``; the token comes from
``LABEL_STUDIO_API_KEY`` and is never written anywhere.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from dsbuild.core import join
from dsbuild.core.decisions import (
    WITHDRAWN,
    add_decisions,
    current_by_tool,
    pairwise_agreement,  # noqa: F401 - part of this module's API (agreement in a pull)
    read_decisions,
)
from dsbuild.core.decisions import aggregate as aggregate_reviews
from dsbuild.core.errors import DsbuildError, require, require_installed
from dsbuild.core.hashing import content_id
from dsbuild.core.progress import progress
from dsbuild.core.records import write_json
from dsbuild.core.resources import bundled_dir

TOOL = "labelstudio"
TOKEN_ENV = "LABEL_STUDIO_API_KEY"
URL_ENV = "LABEL_STUDIO_URL"
STATE_PATH = ("review", "labelstudio.json")
REPORT_NAME = "labelstudio"
CONFIG_DIR = bundled_dir("label_config")  # the wheel's copy, else the checkout's label_config/
PAIR_CONFIG = CONFIG_DIR / "pair_review.xml"
MEDIA_CONFIG = '<View><Image name="image" value="$image"/></View>'
REASONS = ("edit_not_applied", "wrong_thing_changed", "unwanted_change", "artefacts",
           "instruction_unclear")
IMAGE_MODES = ("upload", "local-files")
TASK_BATCH = 100
UPLOAD_BATCH = 20


# ---------------------------------------------------------------------------- connection
@contextmanager
def api_errors(url: str, what: str) -> Iterator[None]:
    """Turn network and HTTP failures of the Label Studio client into clear DsbuildErrors."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        yield
    except httpx.TransportError as exc:
        raise DsbuildError(
            f"cannot reach Label Studio at {url} while trying to {what} ({type(exc).__name__}: "
            f"{exc}); start it with `label-studio start` or pass the right --url"
        ) from None
    except ApiError as exc:
        code = exc.status_code
        if code == 403 and "permission" in _detail(exc.body).lower():
            raise DsbuildError(
                f"Label Studio at {url} accepted the API token but refused to {what} (403: "
                f"{_detail(exc.body)}); use an account with access to this project or "
                "organization"
            ) from None
        if code in (401, 403):
            raise DsbuildError(
                f"Label Studio at {url} refused the API token ({code}) while trying to {what}; "
                f"set {TOKEN_ENV} to the Access Token of your account (Account & Settings). "
                "Label Studio >= 1.23 accepts legacy tokens only when started with "
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true"
            ) from None
        raise DsbuildError(
            f"Label Studio at {url} answered {code} while trying to {what}: {_detail(exc.body)}"
        ) from None


def _detail(body) -> str:
    if isinstance(body, dict):
        for key in ("validation_errors", "detail"):
            if body.get(key):
                return json.dumps(body[key], ensure_ascii=False) if key != "detail" \
                    else str(body[key])
    return str(body)[:500]


def _is_missing(exc: BaseException) -> bool:
    from label_studio_sdk.core.api_error import ApiError

    return isinstance(exc, ApiError) and exc.status_code == 404


def check_installed() -> None:
    """Fail with the pip line before any work when the ``review`` extra is not installed."""
    require_installed("review", "label_studio_sdk", what="dsbuild review")


def connect(url: str, api_key: str | None = None):
    """A Label Studio client for ``url`` whose token has been checked against the server."""
    require("label_studio_sdk", "review", "label-studio-sdk")
    from label_studio_sdk import LabelStudio

    key = api_key or os.environ.get(TOKEN_ENV)
    if not key:
        raise DsbuildError(
            f"no Label Studio token: set {TOKEN_ENV} to your Access Token "
            "(Label Studio → Account & Settings)"
        )
    url = url.rstrip("/")
    client = LabelStudio(base_url=url, api_key=key, timeout=60)
    with api_errors(url, "check the API token"):
        # no retries on this probe: a wrong URL fails at once; later calls retry blips
        client.users.whoami(request_options={"max_retries": 0})
    return client


# ---------------------------------------------------------------------------- state
def state_path(build) -> Path:
    return build.root.joinpath(*STATE_PATH)


def read_state(build) -> dict:
    p = state_path(build)
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DsbuildError(f"{p}: not valid JSON ({exc.msg}); delete it and push again") from None


def resolve_url(build, url: str | None, state: dict | None = None) -> str:
    """--url, else the URL of the last push, else review.url in dsbuild.yaml, else $LABEL_STUDIO_URL."""
    state = state if state is not None else read_state(build)
    found = url or state.get("url") or build.config.review.url or os.environ.get(URL_ENV)
    if not found:
        raise DsbuildError(f"no Label Studio URL: pass --url (e.g. http://localhost:8080) "
                           f"or set {URL_ENV}")
    return found.rstrip("/")


# ---------------------------------------------------------------------------- selection
def select_pairs(build, *, policy: str = "kept", sample_size: int | None = None,
                 stratify_by: str = "agent", seed: int = 0) -> list[dict]:
    """Pairs to review: kept by the filter (or all), a seeded sample stratified by a triple field.

    Within a stratum pairs are ranked by a hash of (seed, pair id), so a larger sample is a
    superset of a smaller one and the choice never depends on record order.
    """
    if policy not in ("kept", "all"):
        raise DsbuildError(f"review policy must be 'kept' or 'all' (got {policy!r})")
    joined = join.scored_pairs(build, kept_only=True) if policy == "kept" \
        else join.all_pairs(build)
    rows = [j._asdict() for j in joined]  # {"pair", "triple", "score"}
    if build.is_complete("verify"):  # verify's verdict goes into the task data
        verified = {r["pair_id"]: r for r in build.records("verify")}
        for r in rows:
            r["verify"] = verified.get(r["pair"]["id"])
    if sample_size is None or sample_size >= len(rows):
        return sorted(rows, key=lambda r: r["pair"]["id"])
    strata: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        key = "all" if stratify_by == "none" else str(r["triple"].get(stratify_by))
        strata[key].append(r)
    for members in strata.values():
        members.sort(key=lambda r: content_id(seed, r["pair"]["id"]))
    quota = _allocate(sample_size, {k: len(v) for k, v in strata.items()})
    chosen = [r for k, members in strata.items() for r in members[:quota[k]]]
    return sorted(chosen, key=lambda r: r["pair"]["id"])


def _allocate(n: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split ``n`` across strata in proportion to their sizes (Sainte-Laguë, capped at size).

    A highest-averages method never takes a pair away from a stratum when ``n`` grows, so a
    larger sample always contains a smaller one.
    """
    quota = dict.fromkeys(sizes, 0)
    for _ in range(min(n, sum(sizes.values()))):
        open_ = [k for k in sorted(sizes) if quota[k] < sizes[k]]
        best = max(open_, key=lambda k: sizes[k] / (2 * quota[k] + 1))
        quota[best] += 1
    return quota


def task_data(row: dict, images: dict[str, str]) -> dict:
    """The task payload: everything the config shows plus ids for idempotent re-pushes."""
    pair, triple, score = row["pair"], row["triple"], row["score"] or {}
    return {
        "pair_id": pair["id"], "triple_id": triple["id"], "agent": triple.get("agent"),
        "level": triple.get("level"), "operation": triple.get("operation"),
        "input_caption": triple["input"], "edit": triple["edit"],
        "output_caption": triple["output"], "input_image": images["input"],
        "output_image": images["output"], "seed": pair.get("seed"),
        "clip_sim_dir": score.get("clip_sim_dir"), "clip_sim_image": score.get("clip_sim_image"),
        **({"verify": (row["verify"] or {}).get("verdict"),
            "verify_reason": (row["verify"] or {}).get("reason")} if "verify" in row else {}),
    }


# ---------------------------------------------------------------------------- projects
def _find_projects(client, title: str) -> list:
    return [p for p in client.projects.list(title=title) if p.title == title]


def _get_project(client, url: str, project_id: int):
    """The project with ``project_id``, or None when it was deleted."""
    with api_errors(url, f"read project {project_id}"):
        try:
            return client.projects.get(project_id)
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise


def _deleted(url: str, state: dict) -> DsbuildError:
    return DsbuildError(
        f"Label Studio project {state.get('project_id')} ('{state.get('title')}') no longer "
        f"exists on {url}; push again with --recreate to make a new one (decisions already "
        "pulled stay in decisions.jsonl)"
    )


def _ensure_project(client, url: str, title: str, config: str, state: dict, recreate: bool):
    """The project pushed to before, else the one titled ``title``, else a new one.

    ``recreate`` always makes a new project (the old one stays on the server as it is).
    """
    if recreate:
        return _create_project(client, url, title, config)
    pid = state.get("project_id") if state.get("url") == url else None
    if pid is not None:
        project = _get_project(client, url, pid)
        if project is not None:
            return project
        raise _deleted(url, state)
    with api_errors(url, f"look up project '{title}'"):
        found = _find_projects(client, title)
    if found:
        project = min(found, key=lambda p: p.id)
        if 'name="verdict"' not in (project.label_config or ""):
            raise DsbuildError(
                f"project '{title}' (id {project.id}) on {url} does not use the dsbuild pair "
                "review config; pick another title with --project"
            )
        return project
    return _create_project(client, url, title, config)


def _create_project(client, url: str, title: str, config: str):
    with api_errors(url, f"create project '{title}' with {PAIR_CONFIG.name}"):
        created = client.projects.create(
            title=title, label_config=config, show_skip_button=True,
            description="dsbuild pair review: accept or reject each generated edit pair",
        )
        return client.projects.get(created.id)


def _task_pages(client, project_id: int, fields: str = "task_only") -> Iterator:
    yield from client.tasks.list(project=project_id, fields=fields, page_size=100)


def _existing_pair_ids(client, url: str, project_id: int) -> set[str]:
    with api_errors(url, f"list the tasks of project {project_id}"):
        return {(t.data or {}).get("pair_id") for t in _task_pages(client, project_id)} - {None}


# ---------------------------------------------------------------------------- images
def _uploads(client, media_id: int) -> dict[str, str]:
    """Files already uploaded to the media project: our file name -> URL the browser loads."""
    out = {}
    for f in sorted(client.files.list(media_id, all_=True), key=lambda f: f.id):
        name = f.file.rsplit("/", 1)[-1]
        out.setdefault(name.split("-", 1)[-1], "/data/" + f.file.lstrip("/"))
    return out


def _upload_images(client, url: str, build, title: str, rows: list[dict],
                   state: dict) -> dict[str, dict[str, str]]:
    """Upload each pair's PNGs (once) to the companion media project; pair id -> URLs."""
    media_title = f"{title} · images"
    media = None
    if state.get("media_project_id") and state.get("url") == url:
        media = _get_project(client, url, state["media_project_id"])
    with api_errors(url, f"prepare media project '{media_title}'"):
        if media is None:
            found = _find_projects(client, media_title)
            media = min(found, key=lambda p: p.id) if found else client.projects.create(
                title=media_title, label_config=MEDIA_CONFIG,
                description="images of the dsbuild review project (uploads only, no tasks)")
        state["media_project_id"] = media.id
        uploaded = _uploads(client, media.id)
    wanted = []
    for r in rows:
        for side in ("input", "output"):
            rel = r["pair"]["images"][side]
            name = f"{r['pair']['id']}_{0 if side == 'input' else 1}.png"
            if name not in uploaded:
                path = build.root / rel
                if not path.exists():
                    raise DsbuildError(f"image {path} of pair {r['pair']['id']} is missing; "
                                       "rerun `dsbuild generate`")
                wanted.append((name, path))
    http = client._client_wrapper.httpx_client
    bar = progress(total=len(wanted), desc="upload images", unit="img")
    for i in range(0, len(wanted), UPLOAD_BATCH):
        batch = wanted[i:i + UPLOAD_BATCH]
        files = {name: (name, path.read_bytes(), "image/png") for name, path in batch}
        with api_errors(url, "upload images"):
            resp = http.request(f"api/projects/{media.id}/import", method="POST",
                                params={"commit_to_project": "false"}, files=files,
                                headers=client._client_wrapper.get_headers())
            if resp.status_code >= 400:
                raise DsbuildError(f"Label Studio at {url} refused an image upload "
                                   f"({resp.status_code}): {resp.text[:300]}")
        bar.update(len(batch))
    bar.close()
    if wanted:
        with api_errors(url, "list uploaded images"):
            uploaded.update(_uploads(client, media.id))
    out = {}
    for r in rows:
        pid = r["pair"]["id"]
        out[pid] = {"input": uploaded[f"{pid}_0.png"], "output": uploaded[f"{pid}_1.png"]}
    return out


def _local_file_urls(client, url: str, build, project, rows: list[dict], document_root: str,
                     state: dict) -> dict[str, dict[str, str]]:
    """URLs served by Label Studio's local-files view, under a Local Storage of the build."""
    root = Path(document_root).resolve()
    build_root = build.root.resolve()
    try:
        build_root.relative_to(root)
    except ValueError:
        raise DsbuildError(
            f"the build {build_root} is not under the document root {root}; start Label Studio "
            "with LOCAL_FILES_DOCUMENT_ROOT set to a parent folder of the build and pass it "
            "as --document-root"
        ) from None
    with api_errors(url, "connect Local Storage to the build"):
        storages = client.import_storage.local.list(project=project.id)
        if not any(build_root.is_relative_to(Path(s.path)) for s in storages if s.path):
            st = client.import_storage.local.create(
                project=project.id, path=str(build_root), title=f"dsbuild {build.name}",
                use_blob_urls=False, description="images of the dsbuild build")
            state["storage_id"] = st.id
    out = {}
    for r in rows:
        urls = {}
        for side in ("input", "output"):
            path = (build.root / r["pair"]["images"][side]).resolve()
            rel = path.relative_to(root).as_posix()
            urls[side] = "/data/local-files/?d=" + quote(rel)
        out[r["pair"]["id"]] = urls
    return out


# ---------------------------------------------------------------------------- push
def push(build, url: str | None = None, *, title: str | None = None,
         sample_size: int | None = None, images: str | None = None, seed: int | None = None,
         policy: str = "kept", document_root: str | None = None, recreate: bool = False,
         config_path: str | Path | None = None, api_key: str | None = None) -> dict:
    """Create or reuse the review project and import the pairs it does not have yet."""
    check_installed()
    settings = build.config.review
    state = read_state(build)
    url = resolve_url(build, url, state)
    title = title or settings.project_title or state.get("title") or f"dsbuild {build.name}"
    images = images or settings.images
    if images not in IMAGE_MODES:
        raise DsbuildError(f"--images must be one of {IMAGE_MODES} (got {images!r})")
    sample_size = sample_size if sample_size is not None else settings.sample_size
    seed = settings.seed if seed is None else seed
    config_file = Path(config_path or PAIR_CONFIG)
    if not config_file.is_file():
        raise DsbuildError(f"label config {config_file} not found; pass --config "
                           "path/to/pair_review.xml (dsbuild ships it in label_config/)")
    config = config_file.read_text(encoding="utf-8")
    rows = select_pairs(build, policy=policy, sample_size=sample_size,
                        stratify_by=settings.stratify_by, seed=seed)
    client = connect(url, api_key)
    if state.get("url") not in (None, url) or state.get("title") not in (None, title):
        state = {}
    project = _ensure_project(client, url, title, config, state, recreate)
    if state.get("project_id") != project.id:
        state = {}
    state.update({"url": url, "title": title, "project_id": project.id, "images": images})
    have = _existing_pair_ids(client, url, project.id)
    new = [r for r in rows if r["pair"]["id"] not in have]
    try:
        if images == "upload":
            urls = _upload_images(client, url, build, title, new, state) if new else {}
        else:
            document_root = document_root or os.environ.get("LOCAL_FILES_DOCUMENT_ROOT") or "/"
            state["document_root"] = str(Path(document_root).resolve())
            urls = _local_file_urls(client, url, build, project, new, document_root, state)
        imported = 0
        bar = progress(total=len(new), desc="import tasks", unit="task")
        for i in range(0, len(new), TASK_BATCH):
            batch = new[i:i + TASK_BATCH]
            tasks = [{"data": task_data(r, urls[r["pair"]["id"]])} for r in batch]
            with api_errors(url, f"import tasks into project {project.id}"):
                client.projects.import_tasks(project.id, request=tasks)
            imported += len(batch)
            bar.update(len(batch))
        bar.close()
    finally:
        # The project exists on the server whatever happened next: remember it.
        state["pushed_at"] = _now()
        write_json(state_path(build), state)
    return {"url": url, "project_id": project.id, "title": title, "images": images,
            "selected": len(rows), "already_there": len(rows) - len(new), "imported": imported,
            "project_url": f"{url}/projects/{project.id}/data"}


# ---------------------------------------------------------------------------- pull
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _iso(value) -> str:
    """A timestamp as ``%Y-%m-%dT%H:%M:%SZ`` (the decisions' format)."""
    if value is None:
        return _now()
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)[:19] + "Z"


def read_annotation(ann: dict, emails: dict[int, str]) -> dict | None:
    """One reviewer's answer from an annotation result, or None when it has no verdict."""
    if ann.get("was_cancelled"):
        return None
    out: dict = {"verdict": None, "reasons": [], "corrected_edit": None, "quality": None}
    for item in ann.get("result") or []:
        name, value = item.get("from_name"), item.get("value") or {}
        if name == "verdict" and value.get("choices"):
            out["verdict"] = str(value["choices"][0]).lower()
        elif name == "reason":
            out["reasons"] = [str(c) for c in value.get("choices") or []]
        elif name == "corrected_edit":
            text = " ".join(str(t) for t in value.get("text") or []).strip()
            out["corrected_edit"] = text or None
        elif name == "quality" and value.get("rating") is not None:
            out["quality"] = value["rating"]
    if out["verdict"] not in ("accept", "reject"):
        return None
    who = ann.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    # created_username reads " email, id" in Label Studio 1.x; used when users cannot be listed
    named = str(ann.get("created_username") or "").strip().rsplit(",", 1)[0].strip()
    out["reviewer"] = emails.get(who) or named or (str(who) if who is not None else "unknown")
    out["at"] = _iso(ann.get("updated_at") or ann.get("created_at"))
    out["annotation_id"] = ann.get("id")
    return out


def aggregate(pair_id: str, reviews: list[dict], **extra) -> dict:
    """One decision from several reviews by the shared rule (``dsbuild.core.decisions.aggregate``:
    majority verdict, a tie rejects; reasons ranked by count, then the order of ``REASONS``)."""
    return aggregate_reviews(pair_id, reviews, tool=TOOL, reason_order=REASONS, **extra)


def _emails(client, url: str) -> dict[int, str]:
    """User id -> email; empty when this token may not list users (names come from tasks)."""
    from label_studio_sdk.core.api_error import ApiError

    with api_errors(url, "list users"):
        try:
            return {u.id: (u.email or u.username or str(u.id)) for u in client.users.list()}
        except ApiError as exc:
            if exc.status_code == 403:
                return {}
            raise


def _fetch(build, url: str | None, api_key: str | None) -> tuple[dict, str, list[dict]]:
    """The project's tasks with their reviews; raises before anything is written."""
    check_installed()
    state = read_state(build)
    if not state.get("project_id"):
        raise DsbuildError(f"{build.root} has no Label Studio project yet "
                           f"({state_path(build)} is missing); run `dsbuild review push` first")
    url = resolve_url(build, url, state)
    client = connect(url, api_key)
    if _get_project(client, url, state["project_id"]) is None:
        raise _deleted(url, state)
    emails = _emails(client, url)
    tasks = []
    with api_errors(url, f"export the annotations of project {state['project_id']}"):
        for t in _task_pages(client, state["project_id"], fields="all"):
            anns = [a if isinstance(a, dict) else a.model_dump() for a in t.annotations or []]
            reviews = [r for r in (read_annotation(a, emails) for a in anns) if r]
            tasks.append({"task_id": t.id, "data": t.data or {}, "reviews": reviews})
    return state, url, tasks


def summarize(tasks: list[dict], decisions: dict[str, dict]) -> dict:
    """Done/pending/agreement overall and per agent."""
    def blank():
        return {"tasks": 0, "done": 0, "pending": 0, "accept": 0, "reject": 0,
                "multi_annotated": 0, "agreement": None, "_agree": []}

    total, per_agent = blank(), defaultdict(blank)
    for t in tasks:
        pid = t["data"].get("pair_id")
        d = decisions.get(pid)
        for bucket in (total, per_agent[str(t["data"].get("agent"))]):
            bucket["tasks"] += 1
            if d is None:
                bucket["pending"] += 1
                continue
            bucket["done"] += 1
            bucket[d["verdict"]] += 1
            if d["agreement"] is not None:
                bucket["multi_annotated"] += 1
                bucket["_agree"].append(d["agreement"])
    for bucket in [total, *per_agent.values()]:
        agree = bucket.pop("_agree")
        bucket["agreement"] = round(sum(agree) / len(agree), 4) if agree else None
    return {**total, "per_agent": dict(sorted(per_agent.items()))}


def _decisions(tasks: list[dict], state: dict) -> dict[str, dict]:
    out = {}
    for t in tasks:
        pid = t["data"].get("pair_id")
        if pid and t["reviews"]:
            out[pid] = aggregate(pid, t["reviews"], task_id=t["task_id"],
                                 project_id=state["project_id"])
    return out


def pull(build, url: str | None = None, *, api_key: str | None = None) -> dict:
    """Write one decision per reviewed pair (majority verdict + agreement) and a report."""
    state, url, tasks = _fetch(build, url, api_key)
    decisions = _decisions(tasks, state)
    # a snapshot: a task whose annotations were all deleted (or skipped) withdraws its
    # earlier decision; a task deleted from the project keeps it, and so does a decision
    # pulled from another project (the one `push --recreate` replaced)
    current = current_by_tool(read_decisions(build))
    present = {t["data"].get("pair_id") for t in tasks} - {None}
    present = {pid for pid in present
               if current.get((pid, TOOL), {}).get("project_id") == state["project_id"]}
    added = add_decisions(build, decisions.values(), withdraw=(TOOL, present))
    summary = summarize(tasks, decisions)
    report = {"url": url, "project_id": state["project_id"], "pulled_at": _now(), **summary,
              "pairs": {pid: {"verdict": d["verdict"], "votes": d["votes"],
                              "agreement": d["agreement"], "tie": d["tie"],
                              "reviewers": d["reviewer"]}
                        for pid, d in sorted(decisions.items())}}
    write_json(build.reports_dir / f"{REPORT_NAME}.json", report)
    plot_summary(summary, build.reports_dir / f"{REPORT_NAME}.png")
    return {"url": url, "project_id": state["project_id"], "tasks": len(tasks),
            "reviewed": len(decisions), "added": len(added),
            "withdrawn": sum(d["verdict"] == WITHDRAWN for d in added),
            "agreement": summary["agreement"],
            "report": str(build.reports_dir / f"{REPORT_NAME}.json")}


def status(build, url: str | None = None, *, api_key: str | None = None) -> dict:
    """Review progress read live from the server: done, pending, agreement, per agent."""
    state, url, tasks = _fetch(build, url, api_key)
    summary = summarize(tasks, _decisions(tasks, state))
    return {"url": url, "project_id": state["project_id"], "title": state.get("title"),
            "project_url": f"{url}/projects/{state['project_id']}/data", **summary}


def plot_summary(summary: dict, path: Path) -> None:
    """Stacked bars per agent: accepted, rejected, pending."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsbuild.core.records import write_figure

    agents = list(summary["per_agent"]) or ["(none)"]
    rows = [summary["per_agent"].get(a, {}) for a in agents]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(agents) + 3), 3.2))
    bottom = [0] * len(agents)
    for key, colour in (("accept", "#4caf50"), ("reject", "#e53935"), ("pending", "#bdbdbd")):
        vals = [r.get(key, 0) for r in rows]
        ax.bar(agents, vals, bottom=bottom, color=colour, label=key)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, r in enumerate(rows):
        if r.get("agreement") is not None:
            ax.text(i, bottom[i], f"agr {r['agreement']:.2f}", ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("pairs")
    agr = summary.get("agreement")
    ax.set_title("Label Studio review" + (f" (agreement {agr:.2f})" if agr is not None else ""))
    ax.set_ylim(0, max(bottom + [1]) * 1.15)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    write_figure(path, fig)
