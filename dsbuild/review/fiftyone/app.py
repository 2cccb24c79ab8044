"""The FiftyOne App on a build's dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from dsbuild.review.fiftyone.dataset import dataset_name, open_dataset
from dsbuild.review.fiftyone.db import import_fiftyone

QUERY_PERFORMANCE = "default_query_performance"  # FiftyOne's App config key
QUERY_PERFORMANCE_ENV = "FIFTYONE_APP_DEFAULT_QUERY_PERFORMANCE"


def app_config(fo):
    """The App config dsbuild launches with: FiftyOne's, with query performance off by default
    unless you chose it (``$FIFTYONE_APP_DEFAULT_QUERY_PERFORMANCE`` or
    ``default_query_performance`` in the App config file). In query performance mode the App's
    header counts every slice's samples of a grouped dataset (3 per pair) and the sidebar shows
    no value counts; without it the header counts groups ("N groups with slice pair": one per
    pair or no-change sample) and the sidebar counts each field's values. A curator can still
    switch it on with the App's lightning button."""
    config = fo.app_config.copy()
    path = Path(os.environ.get("FIFTYONE_APP_CONFIG_PATH",
                               Path.home() / ".fiftyone" / "app_config.json"))
    try:
        in_file = QUERY_PERFORMANCE in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        in_file = False
    if QUERY_PERFORMANCE_ENV not in os.environ and not in_file:
        # the App server (a child process) answers with its own config until the session
        # has pushed this one: it must start with the same default, or a first page loads
        # in query performance mode
        os.environ[QUERY_PERFORMANCE_ENV] = "false"
    if os.environ.get(QUERY_PERFORMANCE_ENV) == "false":  # ours, or yours read at import
        config.default_query_performance = False
    return config


def launch(build, name: str | None = None, *, port: int | None = None,
           address: str | None = None, remote: bool = False):
    """Start the FiftyOne App on the build's dataset; returns (session, url of the grid)."""
    fo = import_fiftyone()
    name = dataset_name(build, name)
    ds = open_dataset(fo, build, name, create=False)
    session = fo.launch_app(ds, port=port, address=address, remote=remote, auto=False,
                            config=app_config(fo))
    # session.url may carry a query (?polling=true, a proxy): the dataset goes in the path
    u = urlsplit(session.url)
    path = f"{u.path.rstrip('/')}/datasets/{quote(name, safe='')}"
    return session, urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))
