"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, /v1/models/{id}.

`model` names an adapter, or the base model (or nothing) for no adapter. Responses and stream
chunks carry `adapter_version` (ours, not OpenAI's; its client keeps extra fields): the version of
the adapter that answered, null for the base model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from adapters import AdapterNotFound
from server.engine.request import FinishReason, InvalidRequest, SamplingParams

from .errors import NoChatTemplate, to_response
from .routes_ops import _version
from .logprobs import chat_logprobs, completion_logprobs, echoed_logprobs, token_texts
from .schemas import ChatCompletionRequest, CompletionRequest
from .sse import Encoder, EventStream
from .service import Job, Service

router = APIRouter(prefix="/v1")


def _service(request: Request) -> Service:
    return request.app.state.service


def _finish(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == FinishReason.LENGTH else "stop"


def _cut_at_stop(text: str, params: SamplingParams, keep: bool = False) -> str:
    """OpenAI leaves the stop sequence out of the text; `keep` (vLLM's include_stop_str_in_output)
    ends it after the stop sequence instead."""
    for stop in params.stop:
        at = text.find(stop)
        if at != -1:
            text = text[:at + len(stop) if keep else at]
    return text


def fingerprint(service: Service) -> str:
    """OpenAI's `system_fingerprint`: what changes the answers to the same request (the server's
    version, the base model and its dtype), stable across restarts."""
    found = getattr(service, "_fingerprint", None)
    if found is None:
        what = f"{_version()}|{service.base.name}|{service.base.spec.dtype}"
        found = service._fingerprint = "fp_" + hashlib.sha256(what.encode()).hexdigest()[:12]
    return found


def _usage(jobs: list[Job], completion_tokens: int) -> dict:
    """jobs: one per prompt (its n answers share its prompt tokens); completion_tokens: every answer's,
    best_of's unreturned ones included, as OpenAI counts them."""
    prompt = sum(len(j.prompt_ids) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _respond(request: Request, jobs: list[Job], model: str, chat: bool, stream: bool, usage: bool = False,
                   logprobs: bool = False, keep_stop: bool = False, echo: list[str] | None = None,
                   prompt_only: bool = False):
    """jobs: one per prompt, each with its answers (n, best_of): choice i * n + j is prompt i's answer j.
    logprobs: each choice carries its tokens' log-probabilities (and the alternatives its parameters'
    `top_logprobs` asks for), in the route's shape. echo (completions): each job's prompt text, before
    its completion (and with logprobs, its tokens' first); prompt_only: the prompt alone (max_tokens
    0), the token run with it left out."""
    service = _service(request)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    streams = []  # per job, its answers' streams; all queued before any response is sent, or none left running
    try:
        for job in jobs:
            streams.append(service.start(job))
    except Exception:
        for s in (s for answers in streams for s in answers):
            s.abort()
        raise

    if stream:  # n answers per prompt, each a choice (best_of equals n here)
        fixed = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model,
                 "system_fingerprint": fingerprint(service), "adapter_version": jobs[0].adapter_version}
        if usage:  # OpenAI: every chunk has `usage`, null but in the last
            fixed["usage"] = None
        flat = [s for answers in streams for s in answers]
        return EventStream(flat, _Chunks(service, jobs, streams, fixed, chat, usage, logprobs, keep_stop, echo,
                                         prompt_only))

    results = await service.collect_all([s for answers in streams for s in answers], request)
    generated = 0 if prompt_only else sum(len(r.seq.output_ids) for r in results)
    choices = []
    texts = token_texts(service.base.tokenizer) if logprobs else None
    for k, job in enumerate(jobs):
        answers = results[:job.answers.generated]
        results = results[job.answers.generated:]
        for j, result in enumerate(answers):
            service.record(job, result.seq, j)
        if job.answers.generated > job.answers.returned:  # best_of: the most likely per token, best first
            answers = sorted(answers, key=lambda r: r.mean_logprob, reverse=True)[:job.answers.returned]
        for result in answers:
            choices.append(_choice(len(choices), job, result, chat, texts, keep_stop, prompt_only,
                                   echo[k] if echo is not None else None))
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": fingerprint(service),
            "adapter_version": jobs[0].adapter_version, "choices": choices, "usage": _usage(jobs, generated)}


def _choice(index: int, job: Job, result, chat: bool, texts, keep_stop: bool, prompt_only: bool,
            echo: str | None) -> dict:
    """One answer as a choice of a response not streamed; texts: token_texts when logprobs are asked."""
    text = _cut_at_stop(result.text, job.params, keep_stop)
    finish = _finish(result.finish_reason)
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": chat_logprobs(result.events, texts) if texts else None}
    events = [] if prompt_only else result.events
    if prompt_only:
        text, finish = "", "length"
    shaped = completion_logprobs(events, texts) if texts else None
    if echo is not None:
        text = echo + text
        if texts:
            shaped = echoed_logprobs(result.seq, texts, shaped, len(echo))
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": shaped}


class _Chunks(Encoder):
    """A completion's stream chunks, OpenAI's: text as it comes, held back while it could still turn
    out to be the start of a stop sequence, each choice's last chunk with its finish_reason, then
    (stream_options.include_usage) a chunk of usage alone, then `[DONE]`. With echo, a choice's first
    chunk starts with its prompt (and, with logprobs, the prompt's tokens), as vLLM streams it."""

    def __init__(self, service: Service, jobs: list[Job], streams: list[list], fixed: dict, chat: bool, usage: bool,
                 logprobs: bool = False, keep_stop: bool = False, echo: list[str] | None = None,
                 prompt_only: bool = False):
        """jobs: one per prompt; streams: per prompt, its answers' streams; choice i * n + j is the jth of
        prompt i (the index `EventStream` gives events). echo: per prompt, its text (completions);
        prompt_only: the prompt alone is the answer (max_tokens 0 with echo)."""
        self.service, self.jobs, self.chat, self.usage = service, jobs, chat, usage
        self.streams = [s for answers in streams for s in answers]
        self.choices = [(job, j) for job, answers in zip(jobs, streams) for j in range(len(answers))]
        self.echo = None if echo is None else [text for text, answers in zip(echo, streams) for _ in answers]
        self.prompt_only = prompt_only
        self.keep_stop = keep_stop  # vLLM's include_stop_str_in_output
        self.texts = token_texts(service.base.tokenizer) if logprobs else None  # None: no logprobs asked
        self.unsent = [[] for _ in self.streams]  # per choice, the events whose logprobs no chunk has carried yet
        self.offsets = [0] * len(self.streams)  # per choice, the text offset of its first unsent event
        self.fixed = fixed
        self.head = json.dumps(fixed)[:-1] + ', "choices": ['  # what every chunk repeats, serialized once
        self.emitted = [""] * len(self.streams)  # text sent so far, per choice
        self.remaining = len(self.streams)

    def _chunk(self, i: int, text: str, finish: str | None, role: bool = False) -> str:
        logprobs = None if role else self._logprobs(i)
        if self.echo is not None and self.echo[i] is not None:  # its first chunk: the prompt before the text
            echo, self.echo[i] = self.echo[i], None
            text = echo + text
            if logprobs is not None:
                logprobs = echoed_logprobs(self.streams[i].seq, self.texts, logprobs, len(echo))
                self.offsets[i] += len(echo)
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return f"data: {self.head}{json.dumps(choice)}]}}\n\n"

    def _logprobs(self, i: int) -> dict | None:
        """The unsent events' logprobs, for the chunk about to go out (None when not asked)."""
        if self.texts is None:
            return None
        events, self.unsent[i] = self.unsent[i], []
        if self.chat:
            return chat_logprobs(events, self.texts)
        shaped = completion_logprobs(events, self.texts, self.offsets[i])
        self.offsets[i] += sum(len(e.text) for e in events)
        return shaped

    def opening(self) -> str:
        return "".join(self._chunk(i, "", None, role=True) for i in range(len(self.streams))) if self.chat else ""

    def event(self, i: int, event) -> str:
        if isinstance(event, Exception):
            self.done = True
            return _sse(json.loads(to_response(event, "/v1").body)) + "data: [DONE]\n\n"
        (job, answer), seq = self.choices[i], self.streams[i].seq
        params = job.params
        if self.prompt_only:  # the prompt alone: the one token run with it is not part of the answer
            if event.finish_reason is None:
                return ""
            event = dataclasses.replace(event, finish_reason=FinishReason.LENGTH)
            seq_text = ""
        else:
            seq_text = seq.text
            if self.texts is not None:
                self.unsent[i].append(event)
        safe = _cut_at_stop(seq_text, params, self.keep_stop)
        if event.finish_reason is None and params.stop:
            hold = max(len(s) for s in params.stop) - 1
            safe = safe[: max(len(self.emitted[i]), len(safe) - hold)]
        delta, self.emitted[i] = safe[len(self.emitted[i]):], safe
        finish = _finish(event.finish_reason)
        out = self._chunk(i, delta, finish) if delta or finish or (self.echo and self.echo[i]) else ""
        if finish:
            self.remaining -= 1
            self.service.record(job, seq, answer)
            if not self.remaining:
                self.done = True
                if self.usage:  # OpenAI's stream_options.include_usage: one last chunk, no choices
                    generated = 0 if self.prompt_only else sum(len(s.seq.output_ids) for s in self.streams)
                    out += _sse({**self.fixed, "choices": [], "usage": _usage(self.jobs, generated)})
                out += "data: [DONE]\n\n"
        return out


async def _adapter(service: Service, body: CompletionRequest | ChatCompletionRequest):
    """The adapter `model` names, or the request's own virtual tokens: `soft_prompt` (base64
    safetensors), or vLLM's `prompt_embeds` (a torch.save pickle, with --allow-prompt-embeds only),
    served before the prompt (docs/soft-prompts.md); `model` may then name only the base model."""
    embeds = getattr(body, "prompt_embeds", None)  # /v1/completions only, as vLLM
    if embeds is not None:
        if service.config.allow_prompt_embeds != "on":
            raise InvalidRequest("prompt_embeds", "vLLM's prompt_embeds (a torch.save pickle) is accepted only with "
                                 "--allow-prompt-embeds; soft_prompt (base64 safetensors) needs no flag")
        if body.soft_prompt is not None:
            raise InvalidRequest("prompt_embeds", "cannot be combined with soft_prompt: send one of them")
        return await service.soft_prompt(embeds, "prompt_embeds", "model", body.model, pickled=True)
    if body.soft_prompt is not None:
        return await service.soft_prompt(body.soft_prompt, "soft_prompt", "model", body.model)
    return await service.adapter(body.model, task=body.adapter_task)


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest):
    service = _service(request)
    service.authorize(request)
    params = body.to_sampling_params(default_max_new_tokens=16)
    prompt = "" if body.prompt is None and body.prompt_embeds is not None else body.prompt  # vLLM: embeddings alone
    if prompt is None:
        raise InvalidRequest("prompt", 'is required (it may be "" with soft_prompt or prompt_embeds)')
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not prompts:
        raise InvalidRequest("prompt", "must not be empty")
    vocab = len(service.base.tokenizer)
    for ids in (p for p in prompts if not isinstance(p, str)):  # token ids (vLLM)
        if not ids:
            raise InvalidRequest("prompt", "a list of token ids must not be empty")
        if out_of_range := [t for t in ids if not 0 <= t < vocab]:
            raise InvalidRequest("prompt", f"token ids must be in [0, {vocab}), got {out_of_range[:5]}")
    if len(prompts) > service.config.max_waiting:  # could never be queued at once
        raise InvalidRequest("prompt", f"{len(prompts)} prompts is more than the {service.config.max_waiting} "
                             "one request may carry (--max-waiting)")
    adapter = await _adapter(service, body)  # once: every prompt runs with the same version
    structured = body.grammar_spec()
    answers = body.answers()
    jobs = [await service.prepare("completions", p, params, adapter, grammar=structured, answers=answers)
            for p in prompts]
    echo = None
    if body.echo:  # the prompt as sent; token ids decoded
        echo = [p if isinstance(p, str) else service.base.tokenizer.decode(j.prompt_ids)
                for p, j in zip(prompts, jobs)]
    return await _respond(request, jobs, body.model or service.base.name, chat=False, stream=bool(body.stream),
                          usage=body.include_usage, logprobs=body.logprobs is not None,
                          keep_stop=bool(body.include_stop_str_in_output), echo=echo, prompt_only=body.prompt_only)


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    service = _service(request)
    service.authorize(request)
    params = body.to_sampling_params(default_max_new_tokens=256)
    tokenizer = service.base.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(f"the base model {service.base.name!r} has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # the template's raise_exception (a role it does not allow, ...), or its own fault
        raise InvalidRequest("messages", f"the chat template of {service.base.name!r} refused them: {exc}") from None
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    jobs = [await service.prepare("chat", ids, params, await _adapter(service, body), grammar=body.grammar_spec(),
                                  answers=body.answers())]
    return await _respond(request, jobs, body.model or service.base.name, chat=True, stream=bool(body.stream),
                          usage=body.include_usage, logprobs=bool(body.logprobs),
                          keep_stop=bool(body.include_stop_str_in_output))


@router.get("/models")
async def models(request: Request):
    """The base model, then every adapter, from the registry's memory alone (no file is read:
    10,000 adapters take milliseconds); `peft_type` is null for an adapter not used since start-up."""
    service = _service(request)
    service.authorize(request)
    await run_in_threadpool(service.registry.follow_names)  # what other servers stored: a store listing
    data = [_model(service, None)] + [_model(service, about) for about in service.registry.summaries()]
    return JSONResponse({"object": "list", "data": data})


@router.get("/models/{model_id:path}")
async def model(request: Request, model_id: str):
    """One model, as /v1/models lists it; 404 (`model_not_found`) for an id it does not list."""
    service = _service(request)
    service.authorize(request)
    if model_id == service.base.name:
        return _model(service, None)
    if model_id not in service.registry:
        raise AdapterNotFound(f"model {model_id!r} not found: neither the base model nor a registered adapter")
    about = next((a for a in service.registry.summaries() if a["name"] == model_id), {"name": model_id})
    return _model(service, about)


def _model(service: Service, about: dict | None) -> dict:
    """OpenAI's model object: the base model (`about` None), or an adapter from its registry summary."""
    created = int(service.started)
    if about is None:
        return {"id": service.base.name, "object": "model", "created": created, "owned_by": "softprompt-server",
                "max_model_len": service.base.max_positions}
    return {"id": about["name"], "object": "model", "created": int(about.get("created_at", created)),
            "owned_by": "softprompt-server", "parent": service.base.name, "root": service.base.name,
            "peft_type": about.get("peft_type"), "max_model_len": service.base.max_positions}
