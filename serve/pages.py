"""The web app's pages: the chat-and-rank page at `/`, the operator console at `/console`, their scripts and styles
under `/static/`, and `GET /ui/config`, what the chat page needs to know of this server.

The pages are plain HTML, CSS and JavaScript modules shipped in the package (serve/web/): no build step, nothing
fetched from elsewhere at run time. They talk to the server through its public and admin HTTP APIs only. The one
library they use, SortableJS (MIT, serve/web/vendor/), gives drag-and-drop ranking with mouse and touch.
"""

from __future__ import annotations

import mimetypes
import os
from os import PathLike
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import Scope

from api.protocol import MAX_N
from deploy.settings import Settings

WEB = Path(__file__).with_name("web")
# Modules must be sent as JavaScript whatever the host's mime.types says (Python 3.11 maps .js to
# application/javascript, which browsers take too; text/javascript is the standard's name).
mimetypes.add_type("text/javascript", ".js")
# The pages run only what this server sends: no inline script, no other origin, not framed by another site.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class WebConfig(BaseModel):
    default_n: int = Field(description="Candidates per prompt when a request gives no `n` (the page's default K)")
    max_n: int = Field(description="The most candidates a request may ask for")
    default_max_tokens: int
    show_versions: bool = Field(description="Whether the chat page names the version that wrote each answer")
    auth: Literal["open", "keys"] = Field(description="`keys`: requests need an API key (`Authorization: Bearer`)")
    policy_version: str = Field(description="The version this server answers with now")


router = APIRouter()


def _page(name: str) -> FileResponse:
    return FileResponse(WEB / name, media_type="text/html", headers=HEADERS)


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return _page("index.html")


@router.get("/console", include_in_schema=False)
async def console_page() -> FileResponse:
    return _page("console.html")


@router.get("/ui/config")
async def web_config(request: Request) -> WebConfig:
    settings: Settings = request.app.state.settings
    return WebConfig(
        default_n=settings.default_n,
        max_n=MAX_N,
        default_max_tokens=settings.default_max_tokens,
        show_versions=settings.web_show_versions,
        auth=settings.auth,
        policy_version=request.app.state.chat.policy_version,
    )


class StaticWithHeaders(StaticFiles):
    """The scripts and styles, with the pages' security headers."""

    def file_response(
        self, full_path: str | PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response


static = StaticWithHeaders(directory=WEB)
