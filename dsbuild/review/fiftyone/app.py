"""The FiftyOne App on a build's dataset."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from dsbuild.review.fiftyone.dataset import dataset_name, open_dataset
from dsbuild.review.fiftyone.db import import_fiftyone


def launch(build, name: str | None = None, *, port: int | None = None,
           address: str | None = None, remote: bool = False):
    """Start the FiftyOne App on the build's dataset; returns (session, url of the grid)."""
    fo = import_fiftyone()
    name = dataset_name(build, name)
    ds = open_dataset(fo, build, name, create=False)
    session = fo.launch_app(ds, port=port, address=address, remote=remote, auto=False)
    # session.url may carry a query (?polling=true, a proxy): the dataset goes in the path
    u = urlsplit(session.url)
    path = f"{u.path.rstrip('/')}/datasets/{quote(name, safe='')}"
    return session, urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))
