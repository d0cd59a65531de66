"""Adapter management: upload and replace (PEFT's own files, multipart), list (paginated), describe,
delete."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterNotFound, InvalidAdapter, check_name

from .errors import TooLarge
from .service import Service

router = APIRouter(prefix="/adapters")
MAX_FORM_PARTS = 8
PAGE_SIZE = 100  # GET /adapters without ?limit
MAX_PAGE_SIZE = 1000  # the largest ?limit (422 above)


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


async def _read_upload(request: Request, service: Service, name_required: bool) -> tuple[str | None, dict]:
    """The form field `name`, checked (None if absent and not required), and PEFT's two files from
    the parts named by field or file name (others, like save_pretrained's README.md, are ignored)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidAdapter("upload must be multipart/form-data with a 'name' field and PEFT's two files")
    request._body = await _read_body(request, service.config.max_upload_bytes)  # form() parses the cached body
    form = await request.form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
    try:
        name = form.get("name")
        if name is None and name_required:
            raise InvalidAdapter("missing form field 'name'")
        if name is not None:
            if not isinstance(name, str):
                raise InvalidAdapter("form field 'name' must be text")
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
    return name, files


@router.post("", status_code=201)
async def upload(request: Request):
    """Form field `name`, and parts `adapter_config.json` and `adapter_model.safetensors` (by field or file name)."""
    service = _service(request)
    service.authorize(request, admin=True)
    name, files = await _read_upload(request, service, name_required=True)
    adapter = await run_in_threadpool(service.registry.add, name, files[CONFIG_FILE], files[WEIGHTS_FILE], "upload")
    return await run_in_threadpool(service.registry.describe, adapter.name)  # may ask the store for its version


@router.put("/{name}")
async def replace(request: Request, name: str):
    """The upload's body (its `name` field optional, and if given the same): a new version of a
    registered adapter, swapped in atomically. Running requests finish with the old version. 404 if
    `name` is not registered (no upsert: POST creates); any error leaves the old version as it was."""
    service = _service(request)
    service.authorize(request, admin=True)
    if check_name(name) not in service.registry:  # 404 before the body is read
        raise AdapterNotFound(f"adapter {name!r} not found")
    form_name, files = await _read_upload(request, service, name_required=False)
    if form_name is not None and form_name != name:
        raise InvalidAdapter(f"form field 'name' is {form_name!r}, but the URL names {name!r}")
    adapter = await run_in_threadpool(service.registry.replace, name, files[CONFIG_FILE], files[WEIGHTS_FILE],
                                      "upload")
    return await run_in_threadpool(service.registry.describe, adapter.name)


@router.get("")
async def list_adapters(request: Request, limit: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
                        after: str | None = Query(None, max_length=256)):
    """Sorted by name: up to `limit` adapters whose names sort after `after`. `next_after` is the
    `after` of the next page, null on the last."""
    service = _service(request)
    service.authorize(request)
    adapters, next_after = await run_in_threadpool(_page, service, limit, after)
    return {"adapters": adapters, "next_after": next_after}


def _page(service: Service, limit: int, after: str | None) -> tuple[list[dict], str | None]:
    """On a worker thread: the page lists the store, a description may read the adapter's config file."""
    names, next_after = service.registry.page(limit, after)
    described = []
    for name in names:
        try:
            described.append(service.registry.describe(name))
        except AdapterNotFound:  # removed since the page was listed
            pass
    return described, next_after


@router.get("/{name}")
async def describe(request: Request, name: str):
    service = _service(request)
    service.authorize(request)
    return await run_in_threadpool(service.registry.describe, name)  # may read its config file


@router.delete("/{name}", status_code=204)
async def delete(request: Request, name: str):
    """Running requests that use the adapter finish with it; new ones get 404."""
    service = _service(request)
    service.authorize(request, admin=True)
    await run_in_threadpool(service.registry.remove, name)
    return Response(status_code=204)
