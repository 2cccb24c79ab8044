"""``push_export``: upload an export (parquet shards, card, grid) to a Hub dataset repo.

Token, endpoint, offline mode and repo-id rules are huggingface_hub's own (``get_token``:
``HF_TOKEN`` or the saved login; ``constants.ENDPOINT``: ``HF_ENDPOINT``;
``constants.HF_HUB_OFFLINE``; ``validate_repo_id``). Only the export's public files are
uploaded, after a scan for secrets and absolute local paths. Hub failures become one clear
error each: no token, a rejected token, no write access, an unreachable Hub.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dsbuild.core.build import Build
from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.exports import export_info
from dsbuild.core.records import write_json, write_text
from dsbuild.export.card import check_public
from dsbuild.export.card_notes import set_pushed
from dsbuild.export.writer import INFO_NAME, export_build

UPLOAD_PATTERNS = ["README.md", "grid.png", INFO_NAME, "data/*.parquet"]


@dataclass
class PushResult:
    repo_id: str
    url: str
    revision: str
    commit: str | None
    files: list[str]


def hub_token() -> str | None:
    """huggingface_hub's token: HF_TOKEN from the environment, else the saved login."""
    hub = require("huggingface_hub")
    try:
        return hub.get_token()
    except Exception:  # a broken token file counts as no login
        return None


def check_repo_id(repo_id: str) -> None:
    """``namespace/name`` by the Hub's own rules (huggingface_hub's validate_repo_id)."""
    require("huggingface_hub")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise DsbuildError(f"repo id {repo_id!r} is not valid on the Hub: {exc}") from None
    if repo_id.count("/") != 1:
        raise DsbuildError(f"repo id {repo_id!r} should look like 'namespace/name'")


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            mod = __import__(name)
            errors.append(mod.TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def explain_http(exc: Exception, repo_id: str, endpoint: str) -> DsbuildError:
    """A Hub HTTP error as a message that says what to do."""
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None)
    if code == 401:
        return DsbuildError(f"the Hub at {endpoint} rejected the token (401 Unauthorized): set a "
                            "valid HF_TOKEN or run `hf auth login`")
    if code == 403:
        return DsbuildError(f"the token may not write to dataset {repo_id!r} (403 Forbidden): "
                            "use a token with write access to that namespace")
    if code == 404:
        return DsbuildError(f"dataset {repo_id!r} or its revision was not found on {endpoint} "
                            "(404); check the repo id and --revision")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DsbuildError(f"the Hub at {endpoint} refused the push of {repo_id!r}: {first}")


def push_export(build: Build, repo_id: str, *, private: bool = False,
                revision: str | None = None, export_dir: str | Path | None = None,
                token: str | None = None) -> PushResult:
    """Export (if stale) and upload BUILD's export to the dataset repo ``repo_id``."""
    check_repo_id(repo_id)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DsbuildError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so nothing can be "
                           "pushed; unset it to push")
    token = token or hub_token()
    if not token:
        raise DsbuildError("no Hugging Face token: set HF_TOKEN (a token with write access) or "
                           "run `hf auth login`")
    result = export_build(build, export_dir)
    folder = result.path
    card = folder / "README.md"
    before = card.read_text(encoding="utf-8")
    set_pushed(folder, {"repo_id": repo_id, "revision": revision or "main"})
    try:
        check_public(folder, build)
        res = _upload(build, folder, repo_id, private, revision, token)
    except BaseException:
        write_text(card, before)  # not pushed after all: the card names the folder again
        raise
    record_push(folder, res)
    return res


def record_push(folder: Path, res: PushResult) -> None:
    """Add a push to the export's export_info.json (the card of a re-export, and a model
    trained on this folder, name the repo from it)."""
    info = export_info(folder) or {}
    pushes = [p for p in info.get("pushes") or []
              if (p.get("repo_id"), p.get("revision")) != (res.repo_id, res.revision)]
    pushes.append({"repo_id": res.repo_id, "revision": res.revision, "commit": res.commit,
                   "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_json(folder / INFO_NAME, {**info, "pushes": pushes})


def _upload(build: Build, folder: Path, repo_id: str, private: bool, revision: str | None,
            token: str) -> PushResult:
    """One commit of the export's public files to the dataset repo."""
    from huggingface_hub import constants

    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                   and _allowed(p.relative_to(folder)))
    hub = require("huggingface_hub")
    endpoint = constants.ENDPOINT.rstrip("/")
    api = hub.HfApi(endpoint=endpoint, token=token)
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="dataset", revision=revision,
            allow_patterns=UPLOAD_PATTERNS,
            commit_message=f"dsbuild export of recipe {build.recipe.name}",
        )
    except HfHubHTTPError as exc:
        raise explain_http(exc, repo_id, endpoint) from None
    except _network_errors() as exc:
        raise DsbuildError(f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {exc}); "
                           "check the network or HF_ENDPOINT") from None
    return PushResult(repo_id, str(url), revision or "main", getattr(info, "oid", None), files)


def _allowed(rel: Path) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(rel.as_posix(), pat) for pat in UPLOAD_PATTERNS)
