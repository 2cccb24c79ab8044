"""Human review in Label Studio: push pairs as tasks, pull annotations back as decisions.

One module per concern: :mod:`.client` (the server: the checked client, API errors, the
project state in ``<build>/review/labelstudio.json``, the label config), :mod:`.push` (choose
pairs, make the project, send images, import tasks from the joined row), :mod:`.pull`
(annotations -> decisions, review status). Nothing here imports label_studio_sdk until a
function needs it.
"""

from dsbuild.core.decisions import pairwise_agreement
from dsbuild.review.labelstudio.client import (
    CONFIG_DIR,
    PAIR_CONFIG,
    REASONS,
    TOKEN_ENV,
    TOOL,
    URL_ENV,
    check_installed,
    connect,
)
from dsbuild.review.labelstudio.pull import aggregate, pull, read_annotation, status, summarize
from dsbuild.review.labelstudio.push import push, select_pairs, task_data

__all__ = ["CONFIG_DIR", "PAIR_CONFIG", "REASONS", "TOKEN_ENV", "TOOL", "URL_ENV", "aggregate",
           "check_installed", "connect", "pairwise_agreement", "pull", "push",
           "read_annotation", "select_pairs", "status", "summarize", "task_data"]
