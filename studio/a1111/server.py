"""How the A1111 API sits beside the Gradio app: one FastAPI sub-app for its routes, and an ASGI dispatch inside
Gradio's server (behind the login gate, `studio/gate.py`) that sends /sdapi/v1/*, /controlnet/* and the API page
(/docs) to it and everything else to Gradio. One process and one port, so a --share link carries the API too; the
same logins, the same model lock, work budget and output folder (`studio.generate` holds them).

Errors answer as A1111's FastAPI does: a bad field 422 with {"detail": [{"loc": ["body", field], "msg", "type"}]},
a refused request 422 (404 for weights that are not on this machine) with {"detail": message}, a full queue 503.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware import Middleware

import annotators
from cldm.errors import CheckpointError, InputError, MissingWeightsError
from studio.a1111.jobs import Jobs, QueueFull
from studio.a1111.payloads import PayloadError
from studio.a1111.routes import api_routes
from studio.gate import route_path
from studio.service import Studio

log = logging.getLogger("app")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

API_PREFIXES = ("/sdapi/", "/controlnet/")
DOCS_PATH = "/docs"  # the API page (FastAPI's), as A1111 serves it
OPENAPI_PATH = "/sdapi/v1/openapi.json"


def is_api_path(path: str) -> bool:
    """Whether a request's path (below the app's root) belongs to the A1111 API."""
    return path.startswith(API_PREFIXES) or path == DOCS_PATH


def api_app(studio: Studio, queue_size: int) -> FastAPI:
    """The A1111 API's routes on `studio`, with at most `queue_size` generations waiting or running at once."""
    app = FastAPI(title="ControlNet studio: A1111 API", docs_url=DOCS_PATH, redoc_url=None, openapi_url=OPENAPI_PATH)
    app.include_router(api_routes(studio, Jobs(studio.stops, queue_size)))

    def answer(status: int, detail: object) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(PayloadError)
    async def bad_field(request: Request, e: PayloadError) -> JSONResponse:
        log.info("API refused %s: %s: %s", request.url.path, e.field, e)
        return answer(422, [{"loc": ["body", e.field], "msg": studio.public(e.message), "type": "value_error"}])

    @app.exception_handler(InputError)
    @app.exception_handler(CheckpointError)
    @app.exception_handler(annotators.AnnotatorError)
    async def refused(request: Request, e: Exception) -> JSONResponse:
        log.info("API refused %s: %s", request.url.path, e)
        return answer(422, studio.public(str(e)))

    @app.exception_handler(MissingWeightsError)
    async def missing(request: Request, e: MissingWeightsError) -> JSONResponse:
        log.info("API refused %s: %s", request.url.path, e)
        return answer(404, studio.public(str(e)))

    @app.exception_handler(QueueFull)
    async def full(request: Request, e: QueueFull) -> JSONResponse:
        return answer(503, str(e))

    @app.exception_handler(torch.cuda.OutOfMemoryError)
    async def out_of_memory(request: Request, e: Exception) -> JSONResponse:
        log.warning("out of GPU memory in %s", request.url.path)
        return answer(507, "Out of GPU memory: lower the resolution or the number of images.")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:  # logged with its traceback by the server
        return answer(500, f"Internal error ({type(e).__name__}); the server log has the details.")

    return app


class ApiDispatch:
    """ASGI middleware in Gradio's server: A1111 API paths go to the API's app, everything else on to Gradio."""

    def __init__(self, app: ASGIApp, api: ASGIApp):
        self.app, self.api = app, api

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and is_api_path(route_path(scope)):
            await self.api(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def dispatch(api: ASGIApp) -> Middleware:
    """What `Blocks.launch(app_kwargs={"middleware": [...]})` takes, after the gate: the A1111 API's dispatch."""
    return Middleware(ApiDispatch, api=api)
