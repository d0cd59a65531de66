"""The one error boundary: domain errors mapped to HTTP statuses, in the shape of the route's API.

TGI's routes (and the rest of ours) answer `{"error": "message", "error_type": "..."}`; OpenAI's
(`/v1/*`) answer `{"error": {"message", "type", "param", "code"}}`, so OpenAI's clients show the
message, with 400 for a bad request where TGI's say 422 (as OpenAI and vLLM answer).
"""

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


# OpenAI's `type` and `code` for those of our error types it has its own for; any other keeps our
# error type as its `code`, and is an "invalid_request_error" under 500, a "server_error" from 500.
# The status is ours, but 400 where ours is 422 (as OpenAI and vLLM answer a bad request).
OPENAI = {
    "validation": ("invalid_request_error", None),
    "not_found": ("invalid_request_error", "model_not_found"),
    "unauthorized": ("invalid_request_error", "invalid_api_key"),
    "forbidden": ("permission_error", "insufficient_permissions"),
}


def is_openai(path: str) -> bool:
    """OpenAI's routes answer errors in OpenAI's shape."""
    return path == "/v1" or path.startswith("/v1/")


def error_response(status: int, message: str, error_type: str, headers: dict | None = None,
                   path: str = "", param: str | None = None) -> JSONResponse:
    """`{"error", "error_type"}`, or OpenAI's `{"error": {"message", "type", "param", "code"}}` when
    `path` is one of its routes (its status then: 400 for a bad request, not 422)."""
    if not is_openai(path):
        return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)
    kind, code = OPENAI.get(error_type, ("invalid_request_error" if status < 500 else "server_error", error_type))
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=400 if status == 422 else status, headers=headers)


def to_response(exc: Exception, path: str = "") -> JSONResponse:
    """The response for `exc`, in the shape of `path`'s API (TGI's by default)."""
    for cls, (status, error_type) in STATUS.items():
        if isinstance(exc, cls):
            headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
            if isinstance(exc, Unauthorized):
                headers = {"WWW-Authenticate": "Bearer"}
            param = getattr(exc, "param", None) or ("model" if isinstance(exc, AdapterNotFound) else None)
            message = str(exc)
            if is_openai(path) and param in ENGINE_NAMES:  # the engine's names, as the client sent them
                param, message = _openai_names(param, message, path)
            return error_response(status, message, error_type, headers, path, param)
    log.exception("unexpected error", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}", "internal", path=path)


ENGINE_NAMES = {"max_new_tokens": "max_tokens", "inputs": "prompt"}  # the engine's (TGI's) names -> OpenAI's


def _openai_names(param: str, message: str, path: str) -> tuple[str, str]:
    """An engine error's parameter, and its mentions in the message, under OpenAI's names (chat's prompt
    is its `messages`)."""
    names = {**ENGINE_NAMES, "inputs": "messages" if path.startswith("/v1/chat") else "prompt"}
    for engine_name, openai_name in names.items():
        message = message.replace(engine_name, openai_name)
    return names[param], message


def install(app: FastAPI) -> None:
    async def domain(request: Request, exc: Exception):
        return to_response(exc, request.url.path)

    async def validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where}: {first.get('msg')}", "validation", path=request.url.path,
                              param=where or None)

    async def http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "http", path=request.url.path)

    for cls in STATUS:
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    # Not `Exception`: Starlette runs that handler in its outermost middleware, which re-raises after
    # answering, and uvicorn then closes the connection under a client that may reuse it.
    # app.py's TrackRequests answers unexpected errors instead (`to_response`).
