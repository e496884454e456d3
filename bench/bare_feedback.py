"""The framework's limit: a FastAPI endpoint that only validates a ranking body, served like rankloop's server.

python -m bench.bare_feedback PORT
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from feedback.models import FeedbackRequest
from serve.main import uvicorn_config

app = FastAPI()


@app.post("/v1/feedback", status_code=201)
async def feedback(body: FeedbackRequest) -> JSONResponse:
    return JSONResponse({"id": "0-0", "duplicate": False, "kind": "ranking"}, status_code=201)


if __name__ == "__main__":
    uvicorn.Server(uvicorn_config(app, "127.0.0.1", int(sys.argv[1]))).run()
