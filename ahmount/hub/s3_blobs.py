"""Blobs in any S3-compatible store (AIStore, MinIO, Ceph RGW, AWS S3), through boto3.

Keys under the configured prefix:

    blobs/ab/<sha256>                 a blob, written only after its bytes hashed to its name
    uploads/<id>/start                a resumable upload exists
    uploads/<id>/p<offset:020d>       a piece of it, appended by any replica

Replicas keep no upload state of their own: a resumable upload's pieces are objects, so the
next PATCH may reach another replica, and ``received`` is the sum of the pieces. Finishing
streams the pieces through sha256 into the final key, with a multipart upload for large blobs
that is completed only when the hash matched — a blob is never visible half-written.

Single-request writes (one PUT, or a batch of small blobs) spool in the serving process
instead, so they cost one PUT per blob.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from ahmount.errors import Conflict, HubUnavailable, InvalidArgument, NotFound
from ahmount.hub.blobs import check_range, hash_mismatch

log = logging.getLogger("ahmount.hub")

PART = 16 << 20  # multipart part size (S3 needs >= 5 MiB for all but the last)
READ_CHUNK = 4 << 20
SPOOL_IN_MEMORY = 8 << 20
#: Times one read asks the store again for the rest of a range whose stream broke off
#: (boto3 retries a request that fails, not a body cut short), waiting RESUME_PAUSE, then
#: twice that, and so on, before it fails as the store being unavailable.
READ_RESUMES = 3
RESUME_PAUSE = 0.1


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise InvalidArgument(f"blob store {url!r} must look like s3://bucket/prefix")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise InvalidArgument(f"blob store {url!r} names no bucket")
        return cls(bucket, prefix.strip("/"))


class S3BlobStore:
    """A :class:`~ahmount.hub.blobs.BlobStore` on S3. ``client`` is a boto3 S3 client."""

    local_reads = False

    def __init__(self, client: Any, location: S3Location, presign: bool = False) -> None:
        self.client = client
        self.bucket = location.bucket
        self.prefix = location.prefix + "/" if location.prefix else ""
        self.presign_enabled = presign
        self._spools: dict[str, IO[bytes]] = {}

    def check(self) -> None:
        """Fail early, with the bucket's name, if the store cannot be reached."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # the operator starting the hub is told why
            why = exc.__cause__ if isinstance(exc, HubUnavailable) else exc
            raise InvalidArgument(f"S3 bucket {self.bucket!r} is not reachable: {why}") from None

    # -- keys --------------------------------------------------------------------------------

    def _blob_key(self, sha256: str) -> str:
        return f"{self.prefix}blobs/{sha256[:2]}/{sha256}"

    def _upload_prefix(self, upload_id: str) -> str:
        if not upload_id.replace("-", "").isalnum():
            raise InvalidArgument(f"upload id {upload_id!r} is malformed")
        return f"{self.prefix}uploads/{upload_id}/"

    def _is_missing(self, exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    # -- reading -----------------------------------------------------------------------------

    def size(self, sha256: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._blob_key(sha256))
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise
        return int(head["ContentLength"])

    def read(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        size = self.size(sha256)
        if size is None:
            raise NotFound(f"blob {sha256} is not stored")
        check_range(sha256, size, start, end)
        # A blob never changes under its name, so the rest of a range that broke off can be
        # asked for again: a store (or a network) that drops a connection mid-body costs the
        # reader a pause, not a download cut short.
        resumed = 0
        while start < end:
            try:
                for chunk in self._ranged(sha256, start, end):
                    start += len(chunk)
                    yield chunk
            except _cut_short() as exc:
                resumed += 1
                if resumed > READ_RESUMES:
                    log.error("blob store unavailable: a read of blob %s broke off %d times "
                              "(%s)", sha256, resumed, exc)
                    raise HubUnavailable("the hub's blob store is unavailable; try again "
                                         "shortly") from exc
                log.warning("blob store broke off a read of blob %s at byte %d (%s); "
                            "asking for the rest", sha256, start, exc)
                time.sleep(RESUME_PAUSE * 2 ** (resumed - 1))

    def _ranged(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of a blob: one ranged GET, its body in chunks."""
        response = self.client.get_object(Bucket=self.bucket, Key=self._blob_key(sha256),
                                          Range=f"bytes={start}-{end - 1}")
        body = response["Body"]
        try:  # a body that ends early raises IncompleteReadError (botocore checks its length)
            yield from body.iter_chunks(READ_CHUNK)
        finally:
            body.close()

    def open_file(self, sha256: str) -> int | None:
        return None  # no local file: bytes come over the network

    def read_cached(self, sha256: str, start: int, end: int) -> bytes | None:
        return None  # every read is a request to the store

    def read_small(self, blobs: list[tuple[str, int]]) -> list[bytes]:
        return [b"".join(self.read(sha256, 0, size)) if size else b""
                for sha256, size in blobs]

    def presign(self, sha256: str, expires: int = 900) -> str | None:
        """A URL that reads the blob straight from the store (clients send Range there), when
        the operator allowed it (``--s3-presign``)."""
        if not self.presign_enabled:
            return None
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._blob_key(sha256)},
            ExpiresIn=expires))

    # -- uploads -----------------------------------------------------------------------------

    def store_small(self, blobs: list[tuple[str, bytes]]) -> None:
        for sha256, data in blobs:  # an object is visible once its PUT completes
            self.client.put_object(Bucket=self.bucket, Key=self._blob_key(sha256), Body=data)

    def start_upload(self, upload_id: str, local: bool = False) -> None:
        if local:
            # Closed by finish_upload or abort_upload, whichever ends the upload.
            self._spools[upload_id] = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY)  # noqa: SIM115
            return
        self.client.put_object(Bucket=self.bucket, Key=self._upload_prefix(upload_id) + "start",
                               Body=b"")

    def _pieces(self, upload_id: str) -> list[tuple[int, str, int]]:
        prefix = self._upload_prefix(upload_id)
        pieces: list[tuple[int, str, int]] = []
        started = False
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                if name == "start":
                    started = True
                elif name.startswith("p"):
                    pieces.append((int(name[1:]), item["Key"], int(item["Size"])))
        if not started:
            raise NotFound(f"upload {upload_id} does not exist")
        return sorted(pieces)

    def upload_received(self, upload_id: str) -> int:
        spool = self._spools.get(upload_id)
        if spool is not None:
            return spool.seek(0, 2)
        received = 0
        for offset, _, size in self._pieces(upload_id):
            if offset != received:
                break
            received += size
        return received

    def append(self, upload_id: str, offset: int, data: bytes) -> int:
        received = self.upload_received(upload_id)
        if offset != received:
            # 409, as tus answers an offset mismatch: the client asks where to go on.
            raise Conflict(
                f"upload {upload_id} has {received} bytes; a write at offset {offset} "
                "would leave a gap or overwrite"
            )
        spool = self._spools.get(upload_id)
        if spool is not None:
            spool.seek(offset)
            spool.write(data)
        else:
            key = f"{self._upload_prefix(upload_id)}p{offset:020d}"
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return offset + len(data)

    def _stream(self, upload_id: str) -> Iterator[bytes]:
        spool = self._spools.get(upload_id)
        if spool is not None:
            spool.seek(0)
            while chunk := spool.read(READ_CHUNK):
                yield chunk
            return
        expected = 0
        for offset, key, size in self._pieces(upload_id):
            if offset != expected:
                raise InvalidArgument(f"upload {upload_id} has a gap at byte {expected}")
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                yield from body.iter_chunks(READ_CHUNK)
            finally:
                body.close()
            expected += size

    def finish_upload(self, upload_id: str, sha256: str, size: int, durable: bool = True) -> None:
        received = self.upload_received(upload_id)
        if received != size:
            self.abort_upload(upload_id)
            raise InvalidArgument(
                f"upload of blob {sha256} is truncated: {received} of {size} bytes arrived")
        digest = hashlib.sha256()
        key = self._blob_key(sha256)
        try:
            if size <= PART:
                data = b"".join(self._stream(upload_id))
                digest.update(data)
                if digest.hexdigest() != sha256:
                    raise hash_mismatch(digest.hexdigest(), sha256)
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
            else:
                self._multipart(upload_id, sha256, key, digest)
        finally:
            self.abort_upload(upload_id)

    def _multipart(self, upload_id: str, sha256: str, key: str, digest: Any) -> None:
        mpu = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        parts: list[dict[str, Any]] = []
        try:
            buffer = bytearray()
            for chunk in self._stream(upload_id):
                digest.update(chunk)
                buffer += chunk
                while len(buffer) >= PART:
                    parts.append(self._put_part(key, mpu["UploadId"], len(parts) + 1,
                                                bytes(buffer[:PART])))
                    del buffer[:PART]
            if buffer:
                parts.append(self._put_part(key, mpu["UploadId"], len(parts) + 1, bytes(buffer)))
            if digest.hexdigest() != sha256:
                raise hash_mismatch(digest.hexdigest(), sha256)
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=mpu["UploadId"],
                MultipartUpload={"Parts": parts})
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                               UploadId=mpu["UploadId"])
            raise

    def _put_part(self, key: str, mpu_id: str, number: int, data: bytes) -> dict[str, Any]:
        result = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=mpu_id,
                                         PartNumber=number, Body=data)
        return {"PartNumber": number, "ETag": result["ETag"]}

    def abort_upload(self, upload_id: str) -> None:
        spool = self._spools.pop(upload_id, None)
        if spool is not None:
            spool.close()
            return
        prefix = self._upload_prefix(upload_id)
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def sync(self) -> None:
        """Nothing to do: S3 acknowledges a PUT once it is durable."""

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._blob_key(sha256))

    def hashes(self) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}blobs/"):
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                if len(name) == 64:
                    yield name


def make_s3_client(endpoint: str | None, region: str | None, access_key: str | None,
                   secret_key: str | None) -> Any:
    """A boto3 S3 client (:class:`_Reachable`); credentials default to boto3's own chain
    (environment, files)."""
    import boto3
    from botocore.config import Config

    return _Reachable(boto3.client(
        "s3", endpoint_url=endpoint, region_name=region or "us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        config=Config(retries={"max_attempts": 5, "mode": "standard"},
                      max_pool_connections=32, s3={"addressing_style": "path"}),
    ))


def _cut_short() -> tuple[type[Exception], ...]:
    """What boto3 raises when a body stops before its end: the connection broke, timed out,
    or closed early."""
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    return (HTTPClientError, IncompleteReadError)


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    """boto3's transport failures (its own retries spent) as :class:`HubUnavailable`."""
    from botocore.exceptions import ConnectionError as Unconnected
    from botocore.exceptions import HTTPClientError

    try:
        yield
    except (Unconnected, HTTPClientError) as exc:
        log.error("blob store unavailable: %s", exc)
        raise HubUnavailable("the hub's blob store is unavailable; try again shortly") \
            from exc


class _Reachable:
    """An S3 client whose calls (and paginations) fail, once boto3's own retries are spent
    on a store that cannot be reached, as :class:`HubUnavailable` (503, which clients
    retry) instead of crashing the request with a traceback and a 500. The reason goes to
    the operator's log, not to callers (it names the store's address)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._client, name)
        if not callable(found) or isinstance(found, type):
            return found
        if name == "get_paginator":
            return lambda operation: _ReachablePages(found(operation))

        @functools.wraps(found)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _reachable():
                return found(*args, **kwargs)

        return call


class _ReachablePages:
    """A boto3 paginator whose pages are fetched under :func:`_reachable`."""

    def __init__(self, paginator: Any) -> None:
        self._paginator = paginator

    def paginate(self, **kwargs: Any) -> Iterator[Any]:
        with _reachable():
            yield from self._paginator.paginate(**kwargs)
