"""The FastAPI application: routes, the error boundary, and the middleware that counts requests
in flight and turns new ones away while the server drains for shutdown."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import errors, routes_adapters, routes_openai, routes_ops, routes_tgi, routes_tokenize
from .errors import TooLarge, error_response, to_response
from .service import Service

log = logging.getLogger(__name__)


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="softprompt-server", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    errors.install(app)
    for module in (routes_tgi, routes_openai, routes_tokenize, routes_adapters, routes_ops):
        app.include_router(module.router)

    app.add_middleware(TrackRequests, service=service)
    return app


class TrackRequests:
    """Plain ASGI middleware (unlike @app.middleware, it leaves `request.is_disconnected()` working):
    counts requests in flight and by status, and answers 503 to new ones while draining."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = self.service
        if service.draining and scope["path"] != "/metrics":
            service.metrics.requests.labels(route=scope["path"], status="503").inc()
            response = error_response(503, "the server is shutting down", "overloaded", {"Retry-After": "5"},
                                      path=scope["path"])
            return await response(scope, receive, send)
        status = "500"
        if not scope["path"].startswith("/adapters"):  # uploads have their own cap (--max-upload-bytes)
            receive = _capped(receive, scope, service.config.max_request_bytes)

        started = False

        async def send_with_status(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = str(message["status"]), True
            await send(message)

        async def app_or_500():
            """An unexpected error still gets its JSON 500, on a connection that stays usable."""
            try:
                await self.app(scope, receive, send_with_status)
            except Exception as exc:
                if started:  # too late for a status: the server closes the connection
                    raise
                await to_response(exc, scope["path"])(scope, receive, send_with_status)

        service.in_flight += 1
        try:
            if receive is None:
                status = "413"
                refusal = to_response(_too_large(service.config.max_request_bytes), scope["path"])
                return await refusal(scope, _no_body, send)
            await app_or_500()
        finally:
            service.in_flight -= 1
            route = getattr(scope.get("route"), "path", "unmatched")  # the template, so labels stay few
            service.metrics.requests.labels(route=route, status=status).inc()


def _capped(receive, scope, limit: int):
    """`receive`, refusing a body over `limit` bytes before anything parses it: None when the
    declared Content-Length is over it, else a receive that raises TooLarge once the bytes are."""
    declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        return None
    size = 0

    async def capped():
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _too_large(limit)
        return message

    return capped


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request body is over the {limit}-byte limit (--max-request-bytes)")


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}
