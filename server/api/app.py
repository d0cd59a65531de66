"""The FastAPI application: routes, the error boundary, and the middleware that counts requests
in flight and turns new ones away while the server drains for shutdown."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import errors, routes_adapters, routes_openai, routes_ops, routes_tgi
from .errors import error_response
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
    for module in (routes_tgi, routes_openai, routes_adapters, routes_ops):
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
            service.metrics.requests.inc(route=scope["path"], status="503")
            response = error_response(503, "the server is shutting down", "overloaded", {"Retry-After": "5"})
            return await response(scope, receive, send)
        status = "500"

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        service.in_flight += 1
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            service.in_flight -= 1
            route = getattr(scope.get("route"), "path", "unmatched")  # the template, so labels stay few
            service.metrics.requests.inc(route=route, status=status)
