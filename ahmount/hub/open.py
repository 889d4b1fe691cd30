"""Open a hub's stores from a data directory or from URLs, as one context manager."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ahmount.errors import InvalidArgument
from ahmount.hub.blobs import BlobStore, LocalBlobStore
from ahmount.hub.metadata import MetadataStore
from ahmount.hub.service import HubService


def open_blobs(spec: str, data_dir: Path) -> BlobStore:
    """``spec`` is empty (``DATA/blobs``), a directory, or ``file:///dir``."""
    if not spec:
        return LocalBlobStore(data_dir / "blobs")
    if spec.startswith("file://"):
        return LocalBlobStore(Path(spec[len("file://"):]))
    if "://" in spec:
        raise InvalidArgument(f"blob store {spec!r} is not supported here")
    return LocalBlobStore(Path(spec))


def metadata_url(spec: str, data_dir: Path) -> str:
    """``spec`` is empty (SQLite in ``DATA/meta.db``) or a SQLAlchemy/PostgreSQL URL."""
    if not spec:
        return f"sqlite:///{data_dir / 'meta.db'}"
    if spec.startswith("postgresql://"):
        return "postgresql+psycopg://" + spec[len("postgresql://"):]
    return spec


@contextmanager
def open_hub(data_dir: Path, db: str = "", blobs: str = "") -> Iterator[HubService]:
    """A :class:`HubService` on the given stores; closes them on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    metadata = MetadataStore(metadata_url(db, data_dir))
    try:
        yield HubService(metadata, open_blobs(blobs, data_dir))
    finally:
        metadata.close()
