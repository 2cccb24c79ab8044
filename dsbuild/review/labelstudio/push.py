"""Pairs to Label Studio as tasks: choose them, make or reuse the project, send the images,
import the tasks it does not have yet (pushing twice adds nothing).

``push`` creates (or reuses, by title) a project with ``label_config/pair_review.xml`` and
imports one task per pair chosen by a policy (kept by filter, a sample size stratified by
agent, deterministic by seed) from the review queue (``review.queue``: by default only the
pairs still headed for the export, most valuable verdict first; ``all``: every pair). Task data are joined rows (:mod:`dsbuild.core.schema`) under
their row names. Images reach the reviewer's browser in one of two ways (``images``):

- ``upload`` (default): the PNGs are uploaded into Label Studio's media folder, attached to a
  companion project ``<title> · images`` (Label Studio parses files uploaded to a project
  against its label config, and a config with two images cannot take raw files). Works with
  any server, local or remote; costs a copy of every image on the server.
- ``local-files``: tasks point at ``/data/local-files/?d=...`` and the project gets a Local
  Storage connection rooted at the build. No copy, but the server must run on the machine
  that holds the build, with ``LOCAL_FILES_SERVING_ENABLED=true`` and
  ``LOCAL_FILES_DOCUMENT_ROOT`` a parent folder of the build.

Pairs of multi-turn sessions go, by ``sessions`` (``review.session_tasks``), as one task per
session run into the companion project ``<title> · sessions`` (``session``, the default), as
per-pair tasks (``pair``), or both ways (``both``); see :mod:`.sessions`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

from dsbuild.core import join
from dsbuild.core import sessions as S
from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.progress import progress
from dsbuild.core.records import write_json
from dsbuild.core.schema import FIELDS, edit_note
from dsbuild.review.labelstudio.client import (
    PAIR_CONFIG,
    SESSION_CONFIG,
    api_errors,
    check_installed,
    connect,
    deleted_error,
    find_projects,
    get_project,
    now,
    read_state,
    resolve_url,
    state_path,
    task_pages,
)
from dsbuild.review.labelstudio.sessions import (
    CONFIG_MARK,
    SESSION_MODES,
    session_runs,
    session_task_data,
    task_content,
)

MEDIA_CONFIG = '<View><Image name="image" value="$image"/></View>'
IMAGE_MODES = ("upload", "local-files")
TASK_BATCH = 100
UPLOAD_BATCH = 20
# the joined row's fields a task carries (pair_review.xml shows them), images aside
TASK_FIELDS = ("pair_id", "triple_id", "agent", "level", "operation", "original_prompt",
               "edit_prompt", "edited_prompt", "seed", "generator", "clip_sim_dir",
               "clip_sim_image", "verify", "verify_reason", "judge_score", "review_priority",
               "edit_prompt_recaptioned")
OLD_TASK_DATA = "$input_caption"  # the config of projects pushed before the joined row


QUEUES = ("export", "all")  # review.queue


def select_pairs(build, *, policy: str = "kept", sample_size: int | None = None,
                 stratify_by: str = "agent", seed: int = 0, queue: str | None = None
                 ) -> list[dict]:
    """Joined rows of the pairs to review: kept by the filter, only those still headed for
    the export unless ``queue`` (else ``review.queue``) is ``all`` (or every generated pair:
    ``policy`` ``all``, which implies queue ``all``), a seeded sample
    stratified by a row field (agent, level, operation) within them; in queue order (highest
    ``review_priority`` first, then pair id) for ``export``, in pair id order for ``all``.

    Within a stratum pairs are ranked by a hash of (seed, pair id), so a larger sample is a
    superset of a smaller one and the choice never depends on record order.
    """
    if policy not in ("kept", "all"):
        raise DsbuildError(f"review policy must be 'kept' or 'all' (got {policy!r})")
    queue = queue or getattr(build.config.review, "queue", "export")
    if queue not in QUEUES:
        raise DsbuildError(f"review queue must be 'export' or 'all' (got {queue!r})")
    rows, _ = join.rows(build, policy=policy)
    if queue == "export" and policy == "kept":  # policy all: every pair, filtered out too
        rows = [r for r in rows if r.get("headed")]
    else:
        queue = "all"
    chosen = rows
    if sample_size is not None and sample_size < len(rows):
        strata: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            key = "all" if stratify_by == "none" else str(r.get(stratify_by))
            strata[key].append(r)
        for members in strata.values():
            members.sort(key=lambda r: content_id(seed, r["pair_id"]))
        quota = _allocate(sample_size, {k: len(v) for k, v in strata.items()})
        chosen = [r for k, members in strata.items() for r in members[:quota[k]]]
    chosen = sorted(chosen, key=lambda r: r["pair_id"])
    if queue == "export":  # stable: ties stay in pair id order
        chosen.sort(key=lambda r: -(r.get("review_priority") or 0.0))
    return chosen


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
    """The task payload: the joined row's fields the config shows, under their row names, plus
    ids for idempotent re-pushes, the generator and the parameters it declares (columns of the
    Data Manager); the images are the URLs the browser loads."""
    declared = {k: v for k, v in row.items() if k not in FIELDS and not k.startswith("_")}
    return {**{k: row.get(k) for k in TASK_FIELDS}, **declared,
            "edit_note": edit_note(row),
            "input_image": images["input"], "edited_image": images["output"]}




# ---------------------------------------------------------------------------- projects


def _ensure_project(client, url: str, title: str, config: str, state: dict, recreate: bool):
    """The project pushed to before, else the one titled ``title``, else a new one.

    ``recreate`` always makes a new project (the old one stays on the server as it is).
    """
    if recreate:
        return _create_project(client, url, title, config)
    pid = state.get("project_id") if state.get("url") == url else None
    if pid is not None:
        project = get_project(client, url, pid)
        if project is None:
            raise deleted_error(url, state)
        return _current(project, url)
    with api_errors(url, f"look up project '{title}'"):
        found = find_projects(client, title)
    if found:
        project = min(found, key=lambda p: p.id)
        if 'name="verdict"' not in (project.label_config or ""):
            raise DsbuildError(
                f"project '{title}' (id {project.id}) on {url} does not use the dsbuild pair "
                "review config; pick another title with --project"
            )
        return _current(project, url)
    return _create_project(client, url, title, config)


def _current(project, url: str):
    """The project, unless its config still reads the task data of an older dsbuild (new
    tasks would show empty captions there)."""
    if OLD_TASK_DATA in (project.label_config or ""):
        raise DsbuildError(
            f"Label Studio project {project.id} ('{project.title}') on {url} was made by an "
            f"older dsbuild (its config reads {OLD_TASK_DATA}); push again with --recreate "
            "to make a project with the current config (decisions already pulled stay)")
    return project


def _create_project(client, url: str, title: str, config: str):
    with api_errors(url, f"create project '{title}' with {PAIR_CONFIG.name}"):
        created = client.projects.create(
            title=title, label_config=config, show_skip_button=True,
            description="dsbuild pair review: accept or reject each generated edit pair",
        )
        return client.projects.get(created.id)


def _set_overlap(client, url: str, project, overlap: int | None) -> int:
    """Have ``overlap`` reviewers label every task (Label Studio's *annotations per task*:
    ``maximum_annotations``, for all tasks: ``overlap_cohort_percentage`` 100); None leaves the
    project as it is. Returns the project's annotations per task."""
    current = project.maximum_annotations or 1
    if overlap is None or (current == overlap and project.overlap_cohort_percentage == 100):
        return current
    with api_errors(url, f"set {overlap} annotations per task on project {project.id}"):
        client.projects.update(project.id, maximum_annotations=overlap,
                               overlap_cohort_percentage=100)
    return overlap


def _existing_pair_ids(client, url: str, project_id: int) -> set[str]:
    with api_errors(url, f"list the tasks of project {project_id}"):
        return {(t.data or {}).get("pair_id") for t in task_pages(client, project_id)} - {None}


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
        media = get_project(client, url, state["media_project_id"])
    with api_errors(url, f"prepare media project '{media_title}'"):
        if media is None:
            found = find_projects(client, media_title)
            media = min(found, key=lambda p: p.id) if found else client.projects.create(
                title=media_title, label_config=MEDIA_CONFIG,
                description="images of the dsbuild review project (uploads only, no tasks)")
        state["media_project_id"] = media.id
        uploaded = _uploads(client, media.id)
    wanted = []
    for r in rows:
        for side in ("input", "output"):
            rel = r["_images"][side]
            name = f"{r['pair_id']}_{0 if side == 'input' else 1}.png"
            if name not in uploaded:
                path = build.root / rel
                if not path.exists():
                    raise DsbuildError(f"image {path} of pair {r['pair_id']} is missing; "
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
        pid = r["pair_id"]
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
            path = (build.root / r["_images"][side]).resolve()
            rel = path.relative_to(root).as_posix()
            urls[side] = "/data/local-files/?d=" + quote(rel)
        out[r["pair_id"]] = urls
    return out


# ---------------------------------------------------------------------------- push


def push(build, url: str | None = None, *, title: str | None = None,
         sample_size: int | None = None, images: str | None = None, seed: int | None = None,
         policy: str = "kept", document_root: str | None = None, recreate: bool = False,
         config_path: str | Path | None = None, api_key: str | None = None,
         overlap: int | None = None, sessions: str | None = None,
         queue: str | None = None) -> dict:
    """Create or reuse the review project and import the pairs it does not have yet, in queue
    order; ``queue`` (else ``review.queue``): ``export`` pushes only the pairs still headed
    for the export (a session run goes when any of its turns is headed), ``all`` every pair
    the policy shows; ``overlap`` (else ``review.overlap``): reviewers per pair, set on the
    project;
    ``sessions`` (else ``review.session_tasks``): how session pairs are reviewed."""
    check_installed()
    settings = build.config.review
    overlap = settings.overlap if overlap is None else overlap
    if overlap is not None and overlap < 1:
        raise DsbuildError(f"--overlap must be at least 1 (got {overlap})")
    state = read_state(build)
    url = resolve_url(build, url, state)
    title = title or settings.project_title or state.get("title") or f"dsbuild {build.name}"
    images = images or settings.images
    if images not in IMAGE_MODES:
        raise DsbuildError(f"--images must be one of {IMAGE_MODES} (got {images!r})")
    sessions = sessions or getattr(settings, "session_tasks", "session")
    if sessions not in SESSION_MODES:
        raise DsbuildError(f"--sessions must be one of {', '.join(SESSION_MODES)} "
                           f"(got {sessions!r})")
    sample_size = sample_size if sample_size is not None else settings.sample_size
    seed = settings.seed if seed is None else seed
    config_file = Path(config_path or PAIR_CONFIG)
    if not config_file.is_file():
        raise DsbuildError(f"label config {config_file} not found; pass --config "
                           "path/to/pair_review.xml (dsbuild ships it in label_config/)")
    config = config_file.read_text(encoding="utf-8")
    rows = select_pairs(build, policy=policy, sample_size=sample_size,
                        stratify_by=settings.stratify_by, seed=seed, queue=queue)
    runs = session_runs(build, rows, policy=policy) if sessions != "pair" else {}
    if sessions == "session":  # session pairs go only as session tasks
        rows = [r for r in rows if not S.is_session(r)]
    client = connect(url, api_key)
    if state.get("url") not in (None, url) or state.get("title") not in (None, title):
        state = {}
    project = _ensure_project(client, url, title, config, state, recreate)
    if state.get("project_id") != project.id:
        state = {}
    state.update({"url": url, "title": title, "project_id": project.id, "images": images})
    overlap = _set_overlap(client, url, project, overlap)
    have = _existing_pair_ids(client, url, project.id)
    new = [r for r in rows if r["pair_id"] not in have]
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
            tasks = [{"data": task_data(r, urls[r["pair_id"]])} for r in batch]
            with api_errors(url, f"import tasks into project {project.id}"):
                client.projects.import_tasks(project.id, request=tasks)
            imported += len(batch)
            bar.update(len(batch))
        bar.close()
        pushed_runs = _push_sessions(client, url, build, title, runs, state, images=images,
                                     document_root=document_root, recreate=recreate,
                                     overlap=overlap) if runs else None
    finally:
        # The project exists on the server whatever happened next: remember it.
        state["pushed_at"] = now()
        write_json(state_path(build), state)
    out = {"url": url, "project_id": project.id, "title": title, "images": images,
           "selected": len(rows), "already_there": len(rows) - len(new), "imported": imported,
           "overlap": overlap,
           "project_url": f"{url}/projects/{project.id}/data"}
    if pushed_runs is not None:
        out["sessions"] = pushed_runs
    return out


# ---------------------------------------------------------------------------- sessions


def _session_project(client, url: str, title: str, state: dict, recreate: bool):
    """The session project pushed to before, else the one titled ``title``, else a new one."""
    config = SESSION_CONFIG.read_text(encoding="utf-8")
    pid = state.get("session_project_id") if not recreate else None
    if pid is not None:
        project = get_project(client, url, pid)
        if project is None:
            raise DsbuildError(
                f"Label Studio project {pid} ('{title}') of this build's sessions no longer "
                f"exists on {url}; push again with --recreate to make a new one (decisions "
                "already pulled stay in decisions.jsonl)")
        return project
    if not recreate:
        with api_errors(url, f"look up project '{title}'"):
            found = find_projects(client, title)
        if found:
            project = min(found, key=lambda p: p.id)
            if CONFIG_MARK not in (project.label_config or ""):
                raise DsbuildError(
                    f"project '{title}' (id {project.id}) on {url} does not use the dsbuild "
                    "session review config; pick another title with --project")
            return project
    with api_errors(url, f"create project '{title}' with {SESSION_CONFIG.name}"):
        created = client.projects.create(
            title=title, label_config=config, show_skip_button=True,
            description="dsbuild session review: a verdict on each turn of an edit session")
        return client.projects.get(created.id)


def _push_sessions(client, url: str, build, title: str, runs: dict[str, list[dict]],
                   state: dict, *, images: str, document_root: str | None, recreate: bool,
                   overlap: int) -> dict:
    """One task per session run in ``<title> · sessions``: new runs imported, a run whose
    turns changed rewritten while nobody has answered it (else left as reviewed: ``stale``)."""
    s_title = f"{title} · sessions"
    if state.get("session_title") != s_title:
        state.pop("session_project_id", None)
    project = _session_project(client, url, s_title, state, recreate)
    state.update({"session_project_id": project.id, "session_title": s_title})
    _set_overlap(client, url, project, overlap)
    with api_errors(url, f"list the tasks of project {project.id}"):
        have = {}
        for t in task_pages(client, project.id, fields="all"):
            run = (t.data or {}).get("session_run")
            if run is not None and run not in have:
                have[run] = t
    todo = {run: rows for run, rows in runs.items()
            if run not in have or have[run].data.get("content") != task_content(rows)}
    stale = [run for run in todo if run in have and (have[run].annotations or [])]
    for run in stale:
        del todo[run]
    turn_rows = [r for rows in todo.values() for r in rows]
    if images == "upload":
        urls = _upload_images(client, url, build, title, turn_rows, state) if turn_rows else {}
    else:
        scratch: dict = {}
        urls = _local_file_urls(client, url, build, project, turn_rows, document_root or "/",
                                scratch)
        if "storage_id" in scratch:
            state["session_storage_id"] = scratch["storage_id"]
    new = [run for run in todo if run not in have]
    with api_errors(url, f"import session tasks into project {project.id}"):
        for i in range(0, len(new), TASK_BATCH):
            client.projects.import_tasks(project.id, request=[
                {"data": session_task_data(run, runs[run], urls)}
                for run in new[i:i + TASK_BATCH]])
        for run in todo:
            if run in have:
                client.tasks.update(str(have[run].id),
                                    data=session_task_data(run, runs[run], urls))
    return {"project_id": project.id, "title": s_title, "runs": len(runs),
            "turns": sum(len(v) for v in runs.values()), "imported": len(new),
            "updated": len(todo) - len(new), "stale": len(stale),
            "already_there": len(runs) - len(todo) - len(stale),
            "project_url": f"{url}/projects/{project.id}/data"}
