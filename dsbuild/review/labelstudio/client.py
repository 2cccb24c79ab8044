"""The Label Studio server: constants, the checked client, API errors, the project state.

The project id lives in ``<build>/review/labelstudio.json``; the token comes from
``LABEL_STUDIO_API_KEY`` and is never written anywhere.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsbuild.core.deps import check, require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.resources import bundled_dir

TOOL = "labelstudio"
TOKEN_ENV = "LABEL_STUDIO_API_KEY"
URL_ENV = "LABEL_STUDIO_URL"
STATE_PATH = ("review", "labelstudio.json")
CONFIG_DIR = bundled_dir("label_config")  # the wheel's copy, else the checkout's label_config/
PAIR_CONFIG = CONFIG_DIR / "pair_review.xml"
SESSION_CONFIG = CONFIG_DIR / "session_review.xml"  # one task per session run, a verdict a turn
REASONS = ("edit_not_applied", "wrong_thing_changed", "unwanted_change", "artefacts",
           "instruction_unclear")  # pair_review.xml's reject reasons, in their order


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
    check("review", what="dsbuild review")


def connect(url: str, api_key: str | None = None):
    """A Label Studio client for ``url`` whose token has been checked against the server."""
    require("label_studio_sdk")
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


def find_projects(client, title: str) -> list:
    return [p for p in client.projects.list(title=title) if p.title == title]


def get_project(client, url: str, project_id: int):
    """The project with ``project_id``, or None when it was deleted."""
    with api_errors(url, f"read project {project_id}"):
        try:
            return client.projects.get(project_id)
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise


def deleted_error(url: str, state: dict) -> DsbuildError:
    return DsbuildError(
        f"Label Studio project {state.get('project_id')} ('{state.get('title')}') no longer "
        f"exists on {url}; push again with --recreate to make a new one (decisions already "
        "pulled stay in decisions.jsonl)"
    )


def task_pages(client, project_id: int, fields: str = "task_only") -> Iterator:
    yield from client.tasks.list(project=project_id, fields=fields, page_size=100)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
