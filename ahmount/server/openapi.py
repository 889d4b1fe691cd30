"""The API's OpenAPI 3.1 document, generated from the route table: each operation's summary
from its endpoint's docstring, its path parameters with the grammar of :mod:`ahmount.names`,
its JSON body from the pydantic schema, and the statuses any operation may answer."""

from __future__ import annotations

from typing import Any

from ahmount.server.requests import Bodies, Routes

_NAME_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 128,
                "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]*$"}
#: What each path parameter may be (the same grammar as :mod:`ahmount.names`).
_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "owner": _NAME_SCHEMA, "folder": _NAME_SCHEMA, "asset": _NAME_SCHEMA,
    "branch": _NAME_SCHEMA, "ref": _NAME_SCHEMA, "user": _NAME_SCHEMA,
    "kind": {"type": "string", "enum": ["model", "dataset"]},
    "prefix": {"type": "string", "pattern": "^[0-9a-f]{4,64}$"},
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "upload_id": {"type": "string", "format": "uuid"},
    "path": {"type": "string", "minLength": 1, "maxLength": 4096,
             "pattern": "^[^/\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"},
}
#: Statuses any operation may answer (its own success codes, and the error map's).
_STATUSES = {
    "200": "success", "201": "created", "204": "done, no body", "206": "partial content",
    "304": "not modified", "400": "bad input, naming what was wrong",
    "401": "no valid API key", "403": "not permitted", "404": "not found (or not yours)",
    "405": "method not allowed", "409": "conflict", "413": "body too large",
    "416": "range not satisfiable", "422": "bytes do not hash as announced",
    "503": "a store is unavailable",
}


def openapi_document(routes: Routes, bodies: Bodies, open_paths: frozenset[str]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in sorted(set(bodies.values()), key=lambda m: m.__name__):
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(found.pop("$defs", {}))
        components[model.__name__] = found
    error = {"description": "error", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                           "path": {"type": ["string", "null"]}}}}}}}}
    paths: dict[str, Any] = {}
    for path, endpoint, methods in routes:
        doc = (endpoint.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else endpoint.__name__
        params = [
            {"name": name, "in": "path", "required": True,
             "schema": _PATH_PARAMS.get(name, {"type": "string", "minLength": 1})}
            for name in (seg.strip("{}").split(":")[0] for seg in path.split("/")
                         if seg.startswith("{"))
        ]
        operations: dict[str, Any] = {}
        for method in methods:
            operation: dict[str, Any] = {
                "summary": summary,
                "description": doc,
                "operationId": f"{endpoint.__name__}_{method.lower()}",
                "parameters": params,
                "responses": {code: ({"description": text} if code < "400" else
                                     {**error, "description": text})
                              for code, text in _STATUSES.items()},
            }
            if path in open_paths:
                operation["security"] = []  # anyone may call it
            body = bodies.get((endpoint, method))
            if body is not None:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {
                        "$ref": f"#/components/schemas/{body.__name__}"}}}}
            operations[method.lower()] = operation
        paths[path.replace(":path}", "}")] = operations
    return {
        "openapi": "3.1.0",
        "info": {"title": "ahmount hub", "version": "1"},
        "components": {"schemas": components,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
        "security": [{"apiKey": []}],
        "paths": paths,
    }
