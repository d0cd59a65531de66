"""Adapter management: upload (PEFT's own files, multipart), list, describe, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters import CONFIG_FILE, WEIGHTS_FILE, InvalidAdapter, check_name

from .errors import TooLarge
from .service import Service

router = APIRouter(prefix="/adapters")
MAX_FORM_PARTS = 8


def _service(request: Request) -> Service:
    return request.app.state.service


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"upload of {declared} bytes is over the {limit}-byte limit (--max-upload-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"upload is over the {limit}-byte limit (--max-upload-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("", status_code=201)
async def upload(request: Request):
    """Form field `name`, and parts `adapter_config.json` and `adapter_model.safetensors` (by field or file name)."""
    service = _service(request)
    service.authorize(request, admin=True)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidAdapter("upload must be multipart/form-data with a 'name' field and PEFT's two files")
    request._body = await _read_body(request, service.config.max_upload_bytes)  # form() parses the cached body
    form = await request.form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
    try:
        name = form.get("name")
        if not isinstance(name, str):
            raise InvalidAdapter("missing form field 'name'")
        check_name(name)
        files = {}
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                key = field if field in (CONFIG_FILE, WEIGHTS_FILE) else (value.filename or "").rsplit("/", 1)[-1]
                files[key] = await value.read()
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if required not in files:
                raise InvalidAdapter(f"missing file part {required!r}")
    finally:
        await form.close()
    adapter = await run_in_threadpool(service.registry.add, name, files[CONFIG_FILE], files[WEIGHTS_FILE], "upload")
    return adapter.describe()


@router.get("")
async def list_adapters(request: Request):
    service = _service(request)
    service.authorize(request)
    return {"adapters": [a.describe() for a in service.registry.list()]}


@router.get("/{name}")
async def describe(request: Request, name: str):
    service = _service(request)
    service.authorize(request)
    return service.registry.get(name).describe()


@router.delete("/{name}", status_code=204)
async def delete(request: Request, name: str):
    """Running requests that use the adapter finish with it; new ones get 404."""
    service = _service(request)
    service.authorize(request, admin=True)
    await run_in_threadpool(service.registry.remove, name)
    return Response(status_code=204)
