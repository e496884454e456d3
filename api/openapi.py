"""The OpenAPI spec the server publishes, made truthful: every operation lists the errors it can answer (in
OpenAI's error shape), never the 422 FastAPI assumes (validation errors are 400 here), the content types it sends
(SSE for a streamed chat, Prometheus text for /metrics), and no reference that does not resolve."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.protocol import ErrorResponse

# Every operation can meet these: bad input (400), no or a wrong key (401, 403), nothing there (404), a conflict
# (409), a body too large (413) or not JSON (415), a quota (429), Redis or the engine away (503).
ERRORS = {
    "400": "Bad input; `error.param` names the field to fix",
    "401": "An API key (RANKLOOP_AUTH=keys) or the admin token is wanted",
    "403": "The key's role is too low, the admin token is wrong, or a browser page of another origin sent it",
    "404": "No such comparison, version or model; or the admin API is off",
    "409": "A conflict: ranked already with another order, an idempotency key reused, the current version changed",
    "413": "The body is over the size limit",
    "415": "The body is not declared `application/json`",
    "429": "Over a quota; `Retry-After` says when to retry",
    "503": "Redis or the engine is away, or a swap failed; `Retry-After` where a retry will do",
}
ERROR_SCHEMA = "#/components/schemas/ErrorResponse"
SPECIAL_CONTENT = {
    # Each server-sent event: `data` a ChatCompletionChunk as JSON, an error object, or the final "[DONE]".
    ("/v1/chat/completions", "post"): {
        "text/event-stream": {
            "schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
        }
    },
    ("/metrics", "get"): {"text/plain": {"schema": {"type": "string"}}},
}
REPLACED_CONTENT = {("/metrics", "get")}  # /metrics answers text only


def document(app: FastAPI) -> None:
    """Replace `app.openapi` with the truthful spec (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = truthful(spec)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def truthful(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_hoisted(ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}"), schemas))
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            _hoist_body_defs(operation, schemas)
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status, description in ERRORS.items():
                responses.setdefault(
                    status,
                    {"description": description, "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA}}}},
                )
            extra = SPECIAL_CONTENT.get((path, method))
            if extra is not None:
                ok = next(r for s, r in responses.items() if s.startswith("2"))
                content = ok.setdefault("content", {})
                if (path, method) in REPLACED_CONTENT:
                    content.clear()
                content.update(extra)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return spec


def _hoisted(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """`schema`'s own `$defs` moved into `schemas`; returns {its title: the rest}."""
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    return {schema.get("title", "ErrorResponse"): schema}


def _hoist_body_defs(operation: dict[str, Any], schemas: dict[str, Any]) -> None:
    """A body schema written by hand (pydantic's `model_json_schema`) keeps its models under `$defs`, which a
    reference from inside the spec cannot reach: move them into the components and point the references there."""
    content = operation.get("requestBody", {}).get("content", {})
    for media in content.values():
        schema = media.get("schema", {})
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, _rewritten(definition))
        media["schema"] = _rewritten(schema)


def _rewritten(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: value.replace("#/$defs/", "#/components/schemas/")
            if key == "$ref" and isinstance(value, str)
            else _rewritten(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewritten(item) for item in node]
    return node
