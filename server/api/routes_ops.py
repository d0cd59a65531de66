"""Operations: /health, /info, /metrics."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from adapters import KINDS

from .errors import error_response
from .service import Service

router = APIRouter()
UNHEALTHY_AFTER = 3  # engine steps failed in a row before /health says 503, so an orchestrator restarts us
STALLED_AFTER = 300.0  # seconds requests may wait on one round of the engine thread before /health says 503


def _version() -> str:
    try:
        return version("softprompt-server")
    except PackageNotFoundError:
        return "dev"


@router.get("/health")
async def health(request: Request):
    """200 while the engine serves; 503 while draining, after UNHEALTHY_AFTER failed steps in a row,
    when the engine thread has died, or when requests wait and its current round (a step, and the
    adapter loads between steps) has lasted STALLED_AFTER seconds. That is 300 s, well past a long
    legitimate step: a step prefills at most --max-prefill-tokens (512) of prompt, which for a 7B model
    is about 7 TFLOP, a minute or so in float32 on two CPU cores."""
    service: Service = request.app.state.service
    if service.draining:
        return error_response(503, "shutting down", "overloaded")
    if not service.engine.alive:
        return error_response(503, "the engine thread has stopped", "unhealthy")
    engine = service.engine.engine
    if engine.consecutive_failures >= UNHEALTHY_AFTER:
        return error_response(503, f"the last {engine.consecutive_failures} engine steps failed "
                                   f"(last: {engine.last_failure})", "unhealthy")
    stalled = service.engine.stalled_seconds()
    if stalled >= STALLED_AFTER:
        return error_response(503, f"no engine step has ended for {stalled:.0f} s while requests wait", "unhealthy")
    return {"status": "ok"}


@router.get("/info")
async def info(request: Request):
    service: Service = request.app.state.service
    c, spec = service.config, service.base.spec
    return {
        "model_id": service.base.name,
        "model_dtype": str(spec.dtype).removeprefix("torch."),
        "model_dtype_reason": service.base.dtype_reason,
        "model_device_type": spec.device.type,
        "version": _version(),
        "adapter_kinds": sorted(KINDS),
        "adapters": len(service.registry),
        "max_input_tokens": c.max_input_tokens,
        "max_new_tokens": c.max_new_tokens,
        "max_total_tokens": service.base.max_positions,
        "max_batch_size": c.max_batch_size,
        "max_waiting_requests": c.max_waiting,
        "max_prefill_tokens": c.max_prefill_tokens,
        "kv_cache_bytes": service.engine.engine.runner.pool.nbytes(),
        "kv_cache_tokens": service.engine.engine.runner.pool.slots,
        "cpu_threads": threads.info() if (threads := service.engine.threads) else None,
        "compile": compiled.describe() if (compiled := service.engine.engine.runner.compiled) else {"mode": "off"},
        "engine_paths": service.engine.engine.runner.describe(),
        "self_check": service.engine.engine.self_check,
        "max_upload_bytes": c.max_upload_bytes,
        "max_virtual_tokens": c.max_virtual_tokens,
        "max_request_bytes": c.max_request_bytes,
        "max_stop_sequences": c.max_stop_sequences,
        "max_adapters": c.max_adapters,
        "auth": {"api_key": bool(c.api_key), "admin_key": bool(c.admin_key)},
    }


@router.get("/metrics")
async def metrics(request: Request):
    service: Service = request.app.state.service
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")
