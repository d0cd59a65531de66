"""text-generation-inference / LoRAX routes: POST /generate, /generate_stream and the compat POST /."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.engine.request import InvalidRequest, TokenEvent

from .errors import to_response
from .logprobs import tgi_top_tokens, token_texts
from .schemas import (BestOfSequence, Details, GenerateRequest, GenerateResponse, PrefillToken, StreamDetails,
                      StreamResponse, Token)
from .service import Job, Service
from .sse import Encoder, EventStream

router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


async def _job(service: Service, request: Request, body: GenerateRequest, route: str) -> Job:
    p = body.parameters
    params = body.to_sampling_params(default_max_new_tokens=20, route=route)
    answers = p.answers(params, stream=route == "generate_stream")
    if p.soft_prompt is not None:  # the request's own virtual tokens (docs/soft-prompts.md)
        adapter = await service.soft_prompt(p.soft_prompt, "parameters.soft_prompt", "parameters.adapter_id",
                                            p.adapter_id)
    else:
        adapter = await service.adapter(p.adapter_id, p.adapter_source, request, task=p.adapter_task,
                                        task_param="parameters.adapter_task")
    return await service.prepare(route, body.inputs, params, adapter, truncate=p.truncate, grammar=p.grammar_spec(),
                                 answers=answers)


def _token(event: TokenEvent) -> Token:
    return Token(id=event.token_id, text=event.text, logprob=event.logprob, special=event.special)


def _top_tokens(service: Service, events: list[TokenEvent]) -> list[list[Token]]:
    texts = token_texts(service.base.tokenizer)
    return [tgi_top_tokens(e, texts) for e in events]


def _prefill(service: Service, seq) -> list[PrefillToken]:
    """TGI's `details.prefill`: each prompt token alone, its logprob given the tokens before it."""
    texts = token_texts(service.base.tokenizer)
    return [PrefillToken(id=t, text=texts(t), logprob=lp) for t, lp in zip(seq.prompt_ids, seq.prompt_logprobs)]


def _full_text(body: GenerateRequest, text: str) -> str:
    return body.inputs + text if body.parameters.return_full_text else text


async def _generate(request: Request, body: GenerateRequest, route: str) -> GenerateResponse:
    service = _service(request)
    service.authorize(request)
    job = await _job(service, request, body, route)
    results = await service.collect_all(service.start(job), request)
    for i, result in enumerate(results):
        service.record(job, result.seq, i)
    # best_of: the answer with the most likely tokens, the others in details.best_of_sequences (as TGI)
    best = max(results, key=lambda r: r.mean_logprob)
    details = None
    if body.parameters.details:
        others = [BestOfSequence(generated_text=_full_text(body, r.text), **_details(service, job, r))
                  for r in results if r is not best]
        details = Details(**_details(service, job, best), adapter_version=job.adapter_version,
                          prompt_tokens=len(job.prompt_ids), best_of_sequences=others or None)
    return GenerateResponse(generated_text=_full_text(body, best.text), details=details)


def _details(service: Service, job: Job, result) -> dict:
    """One answer's `AnswerDetails` fields."""
    return dict(
        finish_reason=result.finish_reason.value,
        generated_tokens=len(result.seq.output_ids),
        seed=result.seq.seed if job.params.sampling else None,
        tokens=[_token(e) for e in result.events],
        top_tokens=_top_tokens(service, result.events) if job.params.top_logprobs else None,
        prefill=_prefill(service, result.seq) if job.params.prompt_logprobs else [],
    )


def _body(response: GenerateResponse) -> dict:
    """TGI leaves `details` out unless asked for; inside it, null fields stay (`seed: null`)."""
    if response.details is None:
        return response.model_dump(exclude={"details"})
    return response.model_dump(exclude={"details": {"best_of_sequences"}} if response.details.best_of_sequences is None
                               else None)


@router.post("/generate")
async def generate(request: Request, body: GenerateRequest):
    if body.stream:
        return await generate_stream(request, body)
    return _body(await _generate(request, body, "generate"))


@router.post("/")
async def compat(request: Request, body: GenerateRequest):
    """TGI's compatibility route (lorax-client posts here): a one-element list, or a stream."""
    if body.stream:
        return await generate_stream(request, body)
    return JSONResponse([_body(await _generate(request, body, "compat"))])


@router.post("/generate_stream")
async def generate_stream(request: Request, body: GenerateRequest):
    service = _service(request)
    service.authorize(request)
    if body.parameters.decoder_input_details:
        raise InvalidRequest("parameters.decoder_input_details", "true is not supported with streaming (as TGI)")
    job = await _job(service, request, body, "generate_stream")
    [stream] = service.start(job)  # Overloaded is raised here, before the response starts

    return EventStream([stream], _StreamMessages(service, job, body, stream))


class _StreamMessages(Encoder):
    """TGI's stream: a message per token, the last with the generated text and details; an error
    ends it as a message of its own (the status line is sent already), as TGI does."""

    def __init__(self, service: Service, job: Job, body: GenerateRequest, stream):
        self.service, self.job, self.body, self.stream = service, job, body, stream
        self.index = 0

    def event(self, _i: int, event) -> str:
        if isinstance(event, Exception):
            self.done = True
            return f"data: {json.dumps(json.loads(to_response(event).body))}\n\n"
        self.index += 1
        message = StreamResponse(index=self.index, token=_token(event),
                                 top_tokens=tgi_top_tokens(event, token_texts(self.service.base.tokenizer)))
        if event.finish_reason is not None:
            self.done = True
            seq = self.stream.seq
            message.generated_text = _full_text(self.body, seq.text)
            message.details = StreamDetails(
                finish_reason=event.finish_reason.value,
                generated_tokens=len(seq.output_ids),
                prompt_tokens=len(self.job.prompt_ids),
                seed=seq.seed if self.job.params.sampling else None,
                adapter_version=self.job.adapter_version,
            )
        return f"data: {message.model_dump_json()}\n\n"

    def close(self) -> None:
        if self.stream.seq.finished:
            self.service.record(self.job, self.stream.seq)
