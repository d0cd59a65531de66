"""Tokenizing without generating: POST /tokenize in TGI's shape and in vLLM's (told apart by their
fields: TGI's `inputs`, vLLM's `prompt` or `messages`), and vLLM's POST /detokenize. The base
model's tokenizer serves every adapter (a soft prompt adds virtual tokens, not vocabulary)."""

from __future__ import annotations

from fastapi import APIRouter, Body, Request
from jinja2 import TemplateError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from adapters import AdapterNotFound
from server.engine.request import InvalidRequest

from .errors import NoChatTemplate
from .schemas import ChatMessage, DetokenizeRequest, TgiTokenizeRequest, VllmTokenizeRequest
from .service import INLINE_TOKENIZE_CHARS, Service

router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


def _parse(model, body):
    """The body as `model`, its first validation error an InvalidRequest naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidRequest(where, first.get("msg", "invalid")) from None


async def _encode(service: Service, text: str, add_special_tokens: bool):
    """The tokenizer's encoding (ids and character offsets); long texts on a worker thread."""
    def encode():
        return service.base.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return await run_in_threadpool(encode) if len(text) > INLINE_TOKENIZE_CHARS else encode()


def _check_model(service: Service, name: str | None) -> None:
    if name not in (None, "", service.base.name) and name not in service.registry:
        raise AdapterNotFound(f"model {name!r} not found: neither the base model nor a registered adapter")


@router.post("/tokenize")
async def tokenize(request: Request, body: dict = Body(...)):
    """TGI's `{"inputs", "parameters"}` -> `[{"id", "text", "start", "stop"}]`; vLLM's `{"prompt"}`
    or `{"messages"}` (with `model`) -> `{"count", "max_model_len", "tokens", "token_strs"}`."""
    service = _service(request)
    service.authorize(request)
    if "inputs" in body:
        tgi = _parse(TgiTokenizeRequest, body)
        _check_model(service, tgi.parameters.adapter_id)
        enc = await _encode(service, tgi.inputs, add_special_tokens=True)
        return [{"id": i, "text": tgi.inputs[start:stop], "start": start, "stop": stop}
                for i, (start, stop) in zip(enc.input_ids, enc.offset_mapping)]
    if "prompt" not in body and "messages" not in body:
        raise InvalidRequest("inputs", "give `inputs` (TGI), or `prompt` or `messages` (vLLM)")
    vllm = _parse(VllmTokenizeRequest, body)
    _check_model(service, vllm.model)
    if vllm.messages is not None:
        text = _render_chat(service, vllm.messages, vllm.add_generation_prompt is not False)
        add_special = bool(vllm.add_special_tokens)  # vLLM: off for chat, the template has them
    else:
        text = vllm.prompt or ""
        add_special = vllm.add_special_tokens is not False
    ids = (await _encode(service, text, add_special)).input_ids
    strs = service.base.tokenizer.convert_ids_to_tokens(ids) if vllm.return_token_strs else None
    return {"count": len(ids), "max_model_len": service.base.max_positions, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeRequest):
    """vLLM's: `{"tokens": [...]}` (with `model`) -> `{"prompt": "..."}`, special tokens kept."""
    service = _service(request)
    service.authorize(request)
    _check_model(service, body.model)
    vocab = len(service.base.tokenizer)
    if out_of_range := [t for t in body.tokens if not 0 <= t < vocab]:
        raise InvalidRequest("tokens", f"token ids must be in [0, {vocab}), got {out_of_range[:5]}")
    return {"prompt": service.base.tokenizer.decode(body.tokens)}


def _render_chat(service: Service, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    tokenizer = service.base.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(f"the base model {service.base.name!r} has no chat template")
    rendered = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise InvalidRequest("messages", f"the chat template of {service.base.name!r} refused them: {exc}") from None
