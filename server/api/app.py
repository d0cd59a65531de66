"""The FastAPI application: routes, the error boundary, and the middleware that counts requests
in flight and turns new ones away while the server drains for shutdown."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

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

    @app.middleware("http")
    async def track(request: Request, call_next):
        route = request.url.path
        if service.draining and route != "/metrics":
            service.metrics.requests.inc(route=route, status="503")
            return error_response(503, "the server is shutting down", "overloaded", {"Retry-After": "5"})
        service.in_flight += 1
        try:
            response = await call_next(request)
        finally:
            service.in_flight -= 1
        service.metrics.requests.inc(route=_route_label(request), status=str(response.status_code))
        return response

    return app


def _route_label(request: Request) -> str:
    """The route's template (/adapters/{name}), so labels stay few."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")
