"""Label Studio annotations back as decisions: one per pair, the annotators' majority.

``pull`` turns the annotations into one decision per pair (tool ``labelstudio``): the majority
verdict of its annotators, their agreement, the reasons and a corrected instruction; a task
whose annotations are gone withdraws its decision. ``status`` counts done/pending/agreement
per agent. A session task (:mod:`.sessions`) counts as one task per turn: each turn's answers
are that turn's pair's reviews (merged with its per-pair task's, where it has one).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from dsbuild.core.decisions import WITHDRAWN, add_decisions, current_by_tool, read_decisions
from dsbuild.core.decisions import aggregate as aggregate_reviews
from dsbuild.core.errors import DsbuildError
from dsbuild.core.records import write_json
from dsbuild.review.labelstudio.client import (
    REASONS,
    TOOL,
    api_errors,
    check_installed,
    connect,
    deleted_error,
    get_project,
    now,
    read_state,
    resolve_url,
    state_path,
    task_pages,
)
from dsbuild.review.labelstudio.sessions import turn_results

REPORT_NAME = "labelstudio"


def _iso(value) -> str:
    """A timestamp as ``%Y-%m-%dT%H:%M:%SZ`` (the decisions' format)."""
    if value is None:
        return now()
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
    if get_project(client, url, state["project_id"]) is None:
        raise deleted_error(url, state)
    emails = _emails(client, url)
    tasks = []
    with api_errors(url, f"export the annotations of project {state['project_id']}"):
        for t in task_pages(client, state["project_id"], fields="all"):
            anns = [a if isinstance(a, dict) else a.model_dump() for a in t.annotations or []]
            reviews = [r for r in (read_annotation(a, emails) for a in anns) if r]
            tasks.append({"task_id": t.id, "data": t.data or {}, "reviews": reviews,
                          "project_id": state["project_id"]})
    session_project = state.get("session_project_id")
    if session_project is not None:
        if get_project(client, url, session_project) is None:
            raise DsbuildError(
                f"Label Studio project {session_project} ('{state.get('session_title')}') of "
                f"this build's sessions no longer exists on {url}; push again with --recreate "
                "to make a new one (decisions already pulled stay in decisions.jsonl)")
        with api_errors(url, f"export the annotations of project {session_project}"):
            for t in task_pages(client, session_project, fields="all"):
                tasks += _turn_tasks(t, emails, session_project)
    return state, url, tasks


def _turn_tasks(task, emails: dict[int, str], project_id: int) -> list[dict]:
    """A session task as one task per turn: the turn's data (with the session's agent and
    run) and the reviews its verdict, reasons and correction make."""
    data = task.data or {}
    turns = data.get("turns") or []
    reviews: dict[int, list[dict]] = defaultdict(list)
    for a in task.annotations or []:
        ann = a if isinstance(a, dict) else a.model_dump()
        if ann.get("was_cancelled"):
            continue
        for i, part in turn_results(ann).items():
            r = read_annotation(part, emails)
            if r and 0 <= i < len(turns):
                reviews[i].append(r)
    return [{"task_id": task.id, "project_id": project_id,
             "data": {**turn, "agent": data.get("agent"), "session_run": data.get("session_run"),
                      "session_id": data.get("session_id")},
             "reviews": reviews.get(i, [])} for i, turn in enumerate(turns)]


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
    """One decision per reviewed pair, from every task that shows it (its per-pair task and
    its session run's turn); the task and project named are the first that has reviews."""
    reviews: dict[str, list[dict]] = defaultdict(list)
    first: dict[str, dict] = {}
    for t in tasks:
        pid = t["data"].get("pair_id")
        if pid and t["reviews"]:
            reviews[pid] += t["reviews"]
            first.setdefault(pid, t)
    out = {}
    for pid, found in reviews.items():
        t = first[pid]
        extra = {"task_id": t["task_id"], "project_id": t.get("project_id", state["project_id"])}
        if t["data"].get("session_run"):
            extra.update(session_run=t["data"]["session_run"], turn=t["data"].get("turn"))
        out[pid] = aggregate(pid, found, **extra)
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
    projects = {state["project_id"], state.get("session_project_id")} - {None}
    present = {pid for pid in present
               if current.get((pid, TOOL), {}).get("project_id") in projects}
    added = add_decisions(build, decisions.values(), withdraw=(TOOL, present))
    summary = summarize(tasks, decisions)
    report = {"url": url, "project_id": state["project_id"], "pulled_at": now(), **summary,
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
