"""Signed read grants: one blob's bytes readable without an API key, for a while.

An object read answered by the hub carries a *read URL* for the object's blob (the
``X-Ah-Read-Url`` header): its later ranges (a random reader's pages, a fill, a stream's
next run) are then read through it, and the hub serves them with no authentication,
resolution or lookup — the signature is the check. What a request through the object's
path costs is two thirds metadata work, and a random reader pays it once per miss.

A grant names the blob, the user it was issued to (for the access log and audits) and when
it expires, and is signed with the hub's key (HMAC-SHA256, compared in constant time). It
is a bearer capability, as an S3 presigned URL is: whoever holds the URL reads that blob's
bytes until it expires, and a share revoked meanwhile does not cut it short. Hence the
short life (:data:`GRANT_SECONDS`), and a grant is only ever issued to a caller the hub
just let read an object with that hash. The key lives in the metadata store, so every
replica of a hub checks the grants of the others.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from ahmount.errors import PermissionDenied

#: How long a grant reads its blob: as long as an S3 presigned URL's default here.
GRANT_SECONDS = 900
#: The longest user id a grant may name (ids are UUIDs; anything longer is forged).
MAX_USER = 64


@dataclass(frozen=True)
class Grant:
    """A blob's read grant, as the read URL's query carries it."""

    sha256: str
    user: str
    expires: int  # Unix time, seconds
    signature: str  # hex

    def query(self) -> str:
        return f"user={self.user}&expires={self.expires}&signature={self.signature}"


class ReadGrants:
    """Issues and checks grants signed with ``key``. ``clock`` is the wall clock (tests
    move it)."""

    def __init__(self, key: bytes, ttl: int = GRANT_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        if len(key) < 16:
            raise ValueError("a read-grant key needs at least 16 bytes")
        self._key = key
        self._ttl = ttl
        self._clock = clock

    def _sign(self, sha256: str, user: str, expires: int) -> str:
        message = f"{sha256}\n{user}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def issue(self, sha256: str, user: str) -> Grant:
        expires = int(self._clock()) + self._ttl
        return Grant(sha256, user, expires, self._sign(sha256, user, expires))

    def check(self, sha256: str, user: str, expires: str, signature: str) -> None:
        """Raises :class:`PermissionDenied` naming what is wrong, unless the grant is this
        hub's for ``sha256`` and has not expired (the signature is checked first: nothing
        about a forged grant is told apart)."""
        where = f"read URL of blob {sha256}"
        if not user or not expires or not signature:
            missing = [n for n, v in (("user", user), ("expires", expires),
                                      ("signature", signature)) if not v]
            raise PermissionDenied(f"{where} lacks {', '.join(missing)}: ask for the object "
                                   "again for a new one")
        if len(user) > MAX_USER or not (expires.isascii() and expires.isdigit()) or \
                len(expires) > 12:
            raise PermissionDenied(f"{where} is malformed: ask for the object again")
        wanted = self._sign(sha256, user, int(expires)).encode()
        # As bytes: compare_digest refuses a str that is not ASCII (a fuzzer's signature).
        if not hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), wanted):
            raise PermissionDenied(f"{where} has no valid signature")
        if int(expires) <= self._clock():
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(expires)))
            raise PermissionDenied(f"{where} expired at {stamp}: ask for the object again")
