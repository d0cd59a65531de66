"""The one error boundary: domain errors mapped to HTTP statuses, as `{"error", "error_type"}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters import (AdapterExists, AdapterNotFound, AdapterTooLarge, FetchForbidden, InvalidAdapter,
                      SourceUnavailable, StoreFull)
from server.engine.request import GenerationFailed, InvalidRequest, Overloaded

log = logging.getLogger(__name__)


class TooLarge(StarletteHTTPException):
    """A request body over its size limit. An HTTPException, so that FastAPI's body parsing lets it
    through as it is (it turns other errors raised while reading the body into a 400)."""

    def __init__(self, message: str):
        super().__init__(413, message)

    def __str__(self) -> str:
        return self.detail


class Unauthorized(Exception):
    """No credentials where the server requires them."""


class Forbidden(Exception):
    """Credentials that do not grant this operation."""


class ClientGone(Exception):
    """The client disconnected before its response was ready (nobody reads the answer)."""


class NoChatTemplate(Exception):
    """The base model's tokenizer has no chat template."""


STATUS = {
    InvalidRequest: (422, "validation"),
    InvalidAdapter: (422, "invalid_adapter"),
    NoChatTemplate: (422, "no_chat_template"),
    AdapterNotFound: (404, "not_found"),
    AdapterExists: (409, "conflict"),
    TooLarge: (413, "too_large"),
    AdapterTooLarge: (413, "too_large"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    FetchForbidden: (403, "forbidden"),
    Overloaded: (503, "overloaded"),
    SourceUnavailable: (502, "source_unavailable"),
    StoreFull: (507, "insufficient_storage"),
    GenerationFailed: (500, "generation_failed"),
    ClientGone: (499, "client_closed_request"),
}


def error_response(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def to_response(exc: Exception) -> JSONResponse:
    for cls, (status, error_type) in STATUS.items():
        if isinstance(exc, cls):
            headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
            if isinstance(exc, Unauthorized):
                headers = {"WWW-Authenticate": "Bearer"}
            return error_response(status, str(exc), error_type, headers)
    log.exception("unexpected error", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "internal")


def install(app: FastAPI) -> None:
    async def domain(_request: Request, exc: Exception):
        return to_response(exc)

    async def validation(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where}: {first.get('msg')}", "validation")

    async def http(_request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "http")

    for cls in STATUS:
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    # Not `Exception`: Starlette runs that handler in its outermost middleware, which re-raises after
    # answering, and uvicorn then closes the connection under a client that may reuse it.
    # app.py's TrackRequests answers unexpected errors instead (`to_response`).
