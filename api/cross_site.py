"""Requests that change what the model learns or serves (rankings, demonstrations, promotions) must be JSON and,
when a browser sends them, come from this server's own pages or an origin the operator allows.

Why: a browser sends a cross-site form POST, or a `fetch` with `text/plain`, without asking the server first (no
CORS preflight). Without these checks any page a user visits could rank answers or write demonstrations through
the user's browser to a server it can reach, `localhost` included, and teach the model. A JSON content type is
what a browser will not send cross-site without a preflight (which this server never grants), and the Origin
header, which browsers add to every such POST, names the page that sent it. Clients that are not browsers (curl,
SDKs) send no Origin and pass on the content type alone.
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import Request

from api.errors import ApiError


def check_json_from_own_origin(request: Request, allowed: Collection[str] = ()) -> None:
    """Raise ApiError 415 unless the body is declared JSON, 403 when a browser page of another origin sent it."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415,
            f"send the body as JSON with `Content-Type: application/json` (got {content_type or 'no content type'})",
            code="unsupported_media_type",
        )
    origin = request.headers.get("origin")
    if origin is None:
        return
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin != own and origin not in allowed:
        raise ApiError(
            403,
            f"cross-site request refused: the page at {origin} is not this server's ({own}); a web app served "
            "from elsewhere must be listed in RANKLOOP_ALLOWED_ORIGINS",
            code="cross_site",
        )
