"""Reading a model's small config files (``model_index.json``, ``config.json``) from a folder or
the Hugging Face Hub without loading the model: what the load checks and the loaders that pick
a pipeline class share."""

from __future__ import annotations

import os
from pathlib import Path

from dsbuild.core.errors import DsbuildError


class HubUnreachable(DsbuildError):
    """The Hub could not be asked about a model (the network, not the setting): exit 1."""

    exit_code = 1


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: only the local cache can be read."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def config_file(src: str, file: str, setting: str) -> Path:
    """``file`` of a folder or of a Hub repo (from the cache; online, fetched: a small file)."""
    if Path(src).exists():
        path = Path(src) / file
        if not path.is_file():
            raise DsbuildError(f"{setting}: {src} has no {file}; give a folder saved with "
                               "save_pretrained, or a Hub id")
        return path
    from huggingface_hub import errors, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(src, file)
    if isinstance(cached, str):
        return Path(cached)
    if offline():
        raise DsbuildError(f"{setting}: {src!r} is not in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE is set; download it first (`hf download "
                           f"{src}`), give a local folder, or unset HF_HUB_OFFLINE")
    try:
        return Path(hf_hub_download(src, file))
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as exc:
        raise DsbuildError(f"{setting}: no readable Hub repo {src!r} "
                           f"({type(exc).__name__}); check the id or log in") from None
    except errors.EntryNotFoundError:
        raise DsbuildError(f"{setting}: the Hub repo {src!r} has no {file}; it is not the "
                           "kind of model this setting loads") from None
    except Exception as exc:  # noqa: BLE001 - network errors: one line
        raise HubUnreachable(f"{setting}: cannot reach the Hugging Face Hub to check {src!r} "
                           f"({type(exc).__name__}); check the network, or set "
                           "HF_HUB_OFFLINE=1 with the model in the cache") from None


def pipeline_class_name(src: str, setting: str, kind: str) -> str | None:
    """The ``_class_name`` of a diffusers folder's or Hub repo's ``model_index.json`` (which
    pipeline it holds); an unreadable file is one line naming ``setting`` and ``kind``."""
    import json

    path = config_file(src, "model_index.json", setting)
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise DsbuildError(f"{setting}: {path} is unreadable ({exc}); give a diffusers {kind} "
                           "pipeline folder or Hub id") from None
