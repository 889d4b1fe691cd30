"""The declared request bodies of the HTTP API: one pydantic model per route and method.

Every JSON body is parsed by its model before the service sees it: strict types (a string
is no list, a float no integer), no unknown fields, bounded sizes, numbers finite, nesting
bounded by the parser, strings valid UTF-8 (pydantic's parser refuses lone surrogates). The
rules for names, paths and text are :mod:`ahmount.names`' own checks, called from the
models, so the hub, the API, the CLI and the mount share one set. The same models generate
the request bodies of the OpenAPI document, which the schemathesis fuzzer reads.

pydantic (v2) rather than msgspec: its JSON Schema output is what OpenAPI tools and
schemathesis understand directly, its errors locate the field (``adds.3.mtime``), and it
already comes with the server's dependencies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ahmount.errors import InvalidArgument
from ahmount.hub.models import MAX_CHANGES_PER_CALL
from ahmount.names import (
    MAX_BLOB_BYTES,
    MAX_MTIME,
    MAX_NAME_LEN,
    MAX_OBJECT_PATH_BYTES,
    MIN_MTIME,
    check_content_type,
    check_delete_path,
    check_mtime,
    check_object_path,
    check_text,
)

#: Items one call may carry (paths to fetch, hashes to ask about, changes to commit).
MAX_ITEMS = MAX_CHANGES_PER_CALL


def _text(what: str, multiline: bool = False, max_len: int = 65536) -> AfterValidator:
    return AfterValidator(lambda v: check_text(v, what, multiline=multiline, max_len=max_len))


#: ``check_text``'s rule as JSON Schema patterns, so that the document says it too (the
#: check itself stays ``check_text``'s, whose errors say which character is wrong).
_ONE_LINE: dict[str, Any] = {"pattern": r"^[^\x00-\x1f\x7f-\x9f]*$"}
_TEXT: dict[str, Any] = {"pattern": r"^[^\x00-\x08\x0b-\x1f\x7f-\x9f]*$"}


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN,
                            pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")]
Label = Annotated[str, Field(min_length=1, max_length=128, json_schema_extra=_ONE_LINE),
                  _text("label", max_len=128)]
Description = Annotated[str, Field(max_length=10_000, json_schema_extra=_TEXT),
                        _text("description", multiline=True, max_len=10_000)]
Message = Annotated[str, Field(min_length=1, max_length=65536, json_schema_extra=_TEXT),
                    _text("commit message", multiline=True)]
Session = Annotated[str, Field(max_length=64, pattern=r"^[ -~]*$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Not strict: JSON Schema calls 5.0 an integer, so the hub takes it as 5 (never 5.5).
Size = Annotated[int, Field(ge=0, le=MAX_BLOB_BYTES, strict=False)]
_PATH: dict[str, Any] = {"pattern": r"^[^/\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"}
ObjectPath = Annotated[str, Field(min_length=1, max_length=MAX_OBJECT_PATH_BYTES,
                                  json_schema_extra=_PATH), AfterValidator(check_object_path)]
DeletePath = Annotated[str, Field(min_length=1, max_length=MAX_OBJECT_PATH_BYTES + 1,
                                  json_schema_extra=_PATH), AfterValidator(check_delete_path)]
Mtime = Annotated[float, Field(allow_inf_nan=False, json_schema_extra={
                      "minimum": MIN_MTIME, "maximum": MAX_MTIME}),
                  AfterValidator(lambda v: check_mtime(v, "object"))]
ContentType = Annotated[str, Field(max_length=255, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+/"
                                                           r"[!#$%&'*+.^_`|~0-9A-Za-z-]+$"),
                        AfterValidator(lambda v: check_content_type(v, "object"))]
Labels = Annotated[list[Label], Field(max_length=64)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class FolderCreate(Body):
    name: Name
    labels: Labels = []
    description: Description = ""


class AssetCreate(FolderCreate):
    pass


class Described(Body):
    """PATCH of a folder or an asset: only what is given changes."""

    name: Name | None = None
    labels: Labels | None = None
    description: Description | None = None


class Share(Body):
    permission: Literal["view", "edit"]


class Public(Body):
    public: bool


class BranchCreate(Body):
    name: Name


class TagCreate(Body):
    name: Name
    source: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN)] = "main"


class Paths(Body):
    paths: Annotated[list[ObjectPath], Field(max_length=MAX_ITEMS)]


class Add(Body):
    path: ObjectPath
    sha256: Sha256
    size: Size
    mtime: Mtime | None = None
    content_type: ContentType | None = None
    #: Permission bits; 420 (0o644) when not given.
    mode: Annotated[int, Field(ge=0, le=0o777)] | None = None

    def as_entry(self) -> dict[str, Any]:
        """The mapping the service's ``parse_entry`` takes (defaults filled there)."""
        return self.model_dump(exclude_none=True)


class Stage(Body):
    session: Annotated[Session, Field(min_length=1)]
    deletes: Annotated[list[DeletePath], Field(max_length=MAX_ITEMS)] = []
    adds: Annotated[list[Add], Field(max_length=MAX_ITEMS)] = []


class Commit(Body):
    message: Message
    session: Session = ""
    deletes: Annotated[list[DeletePath], Field(max_length=MAX_ITEMS)] = []
    adds: Annotated[list[Add], Field(max_length=MAX_ITEMS)] = []
    force: bool = False
    #: Free JSON; the service bounds its depth and checks its strings and numbers.
    metadata: dict[Annotated[str, Field(max_length=256)], Any] = {}
    #: Object path -> the sha256 it must have in the head (null: absent), or nothing is
    #: committed (412, code "changed").
    expect: Annotated[dict[ObjectPath, Sha256 | None], Field(max_length=MAX_ITEMS)] = {}


class Hashes(Body):
    hashes: Annotated[list[Sha256], Field(max_length=MAX_ITEMS)]


class UploadStart(Body):
    sha256: Sha256
    size: Size


class BatchBlob(Body):
    sha256: Sha256
    size: Size


class BatchManifest(Body):
    blobs: Annotated[list[BatchBlob], Field(max_length=MAX_ITEMS)]


def parse(model: type[Body], raw: bytes) -> Any:
    """``raw`` validated as ``model``; raises InvalidArgument naming each bad field."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        found = exc.errors(include_url=False)
        if found and found[0]["type"] == "json_invalid":
            detail = str(found[0]["msg"]).removeprefix("Invalid JSON: ")
            raise InvalidArgument(f"request body is not valid JSON: {detail}") from None
        problems = []
        for error in found[:5]:
            where = ".".join(str(part) for part in error["loc"]) or "body"
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
        raise InvalidArgument(f"request body is invalid: {'; '.join(problems)}") from None
