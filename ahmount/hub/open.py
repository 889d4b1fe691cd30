"""Open a hub's stores from a data directory or from URLs, as one context manager."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import engine as sa_url
from sqlalchemy import exc as sa_exc

from ahmount.errors import HubUnavailable, InvalidArgument
from ahmount.hub.blobs import BlobStore, LocalBlobStore
from ahmount.hub.metadata import MetadataStore
from ahmount.hub.service import HubService


@dataclass(frozen=True)
class S3Options:
    """Where an S3 blob store is; each field falls back to an ``AH_S3_*`` variable and then
    to boto3's own configuration (``AWS_*`` variables, ``~/.aws``)."""

    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    presign: bool = False

    def resolved(self) -> S3Options:
        env = os.environ.get
        return S3Options(
            self.endpoint or env("AH_S3_ENDPOINT"), self.region or env("AH_S3_REGION"),
            self.access_key or env("AH_S3_ACCESS_KEY"), self.secret_key or env("AH_S3_SECRET_KEY"),
            self.presign or env("AH_S3_PRESIGN", "") in ("1", "true", "yes"),
        )


def open_blobs(spec: str, data_dir: Path, s3: S3Options | None = None) -> BlobStore:
    """``spec`` is empty (``DATA/blobs``), a directory, ``file:///dir`` or
    ``s3://bucket/prefix``."""
    if not spec:
        return LocalBlobStore(data_dir / "blobs")
    if spec.startswith("file://"):
        return LocalBlobStore(Path(spec[len("file://"):]))
    if spec.startswith("s3://"):
        from ahmount.hub.s3_blobs import S3BlobStore, S3Location, make_s3_client

        options = (s3 or S3Options()).resolved()
        client = make_s3_client(options.endpoint, options.region, options.access_key,
                                options.secret_key)
        store = S3BlobStore(client, S3Location.parse(spec), presign=options.presign)
        store.check()
        return store
    if "://" in spec:
        raise InvalidArgument(f"blob store {spec!r}: use a directory, file:// or s3://")
    return LocalBlobStore(Path(spec))


def metadata_url(spec: str, data_dir: Path) -> str:
    """``spec`` is empty (SQLite in ``DATA/meta.db``), ``postgresql://…`` or another
    SQLAlchemy URL."""
    if not spec:
        return f"sqlite:///{data_dir / 'meta.db'}"
    if spec.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + spec.split("://", 1)[1]
    if not spec.startswith(("sqlite:", "postgresql+")):
        raise InvalidArgument(f"metadata store {spec!r}: use postgresql://… or sqlite:///…")
    return spec


@contextmanager
def open_hub(data_dir: Path, db: str = "", blobs: str = "",
             s3: S3Options | None = None) -> Iterator[HubService]:
    """A :class:`HubService` on the given stores; closes them on exit."""
    # Private to the hub's user: blobs and meta.db hold every user's private bytes, and the
    # directory's mode keeps other local users out of everything below it.
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    url = metadata_url(db, data_dir)
    try:
        metadata = MetadataStore(url)
    except (sa_exc.OperationalError, HubUnavailable) as exc:  # down, or refuses us
        # The operator starting the hub is told which store and why (the callers of a
        # running hub are not: see metadata._database_errors).
        failed = exc.__cause__ if isinstance(exc, HubUnavailable) else exc
        why = str(getattr(failed, "orig", failed) or exc).splitlines()[0]
        shown = sa_url.make_url(url).render_as_string(hide_password=True)
        raise HubUnavailable(f"metadata store {shown} cannot be opened: {why}") from None
    if not db:
        os.chmod(data_dir / "meta.db", 0o600)
    try:
        yield HubService(metadata, open_blobs(blobs, data_dir, s3))
    finally:
        metadata.close()
