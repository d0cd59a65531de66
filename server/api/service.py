"""What the routes share: the loaded model, registry and engine, auth, request preparation,
collecting a request's tokens, and the per-request metrics and log line."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from adapters import Adapter, AdapterRegistry, inline
from adapters.errors import InvalidTask
from adapters.sources import AdapterSources
from server.config import Config
from server.engine.grammar import Grammar, Grammars, GrammarSpec, vocab_size
from server.engine.async_engine import AsyncEngine, Stream
from server.engine.request import FinishReason, InvalidRequest, SamplingParams, Sequence, TokenEvent
from server.model import BaseModel

from .errors import ClientGone, Forbidden, Unauthorized
from .metrics import Metrics
from .schemas import Answers

ONE = Answers(1, 1, "n")

log = logging.getLogger("softprompt.requests")
MAX_STOP_CHARS = 256  # longest stop sequence
INLINE_TOKENIZE_CHARS = 8192  # longer prompts are tokenized on a worker thread


@dataclass
class Job:
    """A validated generation request, ready for the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: Adapter | None
    route: str
    start: float = field(default_factory=time.monotonic)
    grammar: Grammar | None = None  # structured output: compiled; each start takes its own matcher
    answers: Answers = ONE  # n / best_of: answers generated from the one prompt, and returned

    @property
    def adapter_name(self) -> str:
        return self.adapter.name if self.adapter else ""

    @property
    def adapter_version(self) -> str | None:
        """The version of the adapter this request runs with (held since it was prepared); None: none."""
        return self.adapter.version if self.adapter else None


@dataclass
class Result:
    """A finished request: its tokens as delivered, and the engine's record of it."""

    events: list[TokenEvent]
    seq: Sequence

    @property
    def text(self) -> str:
        return self.seq.text

    @property
    def finish_reason(self) -> FinishReason:
        return self.seq.finish_reason

    @property
    def mean_logprob(self) -> float:
        """The mean log-probability of its tokens: how best_of ranks answers (OpenAI's "highest log
        probability per token", TGI's choice)."""
        logprobs = self.seq.logprobs
        return sum(logprobs) / len(logprobs) if logprobs else float("-inf")


class Service:
    def __init__(self, config: Config, base: BaseModel, registry: AdapterRegistry, engine: AsyncEngine):
        self.config = config
        self.base = base
        self.registry = registry
        allow_hub = tuple(p.strip() for p in (config.allow_hub_adapters or "").split(",") if p.strip())
        self.sources = AdapterSources(registry, max_bytes=config.max_upload_bytes, allow_hub=allow_hub)
        self.engine = engine
        # inline soft prompts: those of requests arriving together materialized in one forward
        self.inline_prefixes = inline.InlinePrefixes(base.spec, base.model, engine.run_between_steps)
        self.metrics = Metrics(engine.engine, registry, max_adapter_labels=config.max_adapter_labels)
        self.draining = False
        self.in_flight = 0  # HTTP requests being handled
        self.started = time.time()
        self.grammars = Grammars(base.tokenizer, vocab_size(base.model), engine.engine.eos_ids)

    # ---- auth -------------------------------------------------------------------------------------
    def authorize(self, request: Request, admin: bool = False) -> None:
        """Generation needs --api-key (or --admin-key) when --api-key is set; adapter changes need
        --admin-key (else --api-key) when set."""
        if admin:
            keys = [self.config.admin_key or self.config.api_key]
        else:
            keys = [self.config.api_key, self.config.admin_key] if self.config.api_key else []
        keys = [k for k in keys if k]
        if not keys:
            return
        given = _given_key(request)
        if not given:
            raise Unauthorized("missing credentials: send 'Authorization: Bearer <key>'")
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise Forbidden("this key does not grant " + ("adapter changes" if admin else "generation"))

    def holds_admin_key(self, request: Request | None) -> bool:
        """Whether the request carries --admin-key (never, where none is set)."""
        key, given = self.config.admin_key, _given_key(request) if request is not None else None
        return bool(key and given) and hmac.compare_digest(given.encode(), key.encode())

    # ---- generation ---------------------------------------------------------------------------------
    async def adapter(self, name: str | None, source: str | None = None,
                      request: Request | None = None, *,
                      task: int | None = None, task_param: str = "adapter_task") -> Adapter | None:
        """None, '' or the base model's own name mean no adapter. `source` (`parameters.adapter_source`)
        says where an adapter the registry does not know is fetched from: None or "local", nowhere.
        `request`: whose admin key lets it fetch hub repos not in --allow-hub-adapters."""
        source = source or "local"
        if source == "s3" and (self.registry.store is None or self.registry.store.source != "s3"):
            raise InvalidRequest("parameters.adapter_source", "'s3' needs an s3:// adapter store (--adapter-store); "
                                 f"this server's store is {self.registry.store.url if self.registry.store else 'none'}")
        # `task` (`adapter_task`): which task of a multitask adapter; refused, naming `task_param`, when
        # missing for one, out of its range, or given for an adapter without tasks.
        if name in (None, "", self.base.name):
            if task is not None:
                raise InvalidRequest(task_param, f"{task!r} needs a multitask adapter; none is named")
            return None
        try:
            return await self._adapter(name, source, task, request)
        except InvalidTask as exc:
            raise InvalidRequest(task_param, str(exc)) from None

    async def _adapter(self, name: str, source: str, task: int | None, request) -> Adapter:
        if source == "local" or name in self.registry:
            adapter = self.registry.get_resident(name, task)  # one look: an eviction after it cannot make a load here
            if adapter is not None:
                return adapter
            return await run_in_threadpool(self.registry.get, name, task)  # a cold load: off the event loop
        try:
            adapter = await run_in_threadpool(self.sources.resolve, name, source, self.holds_admin_key(request))
        except InvalidTask:  # a multitask adapter, fetched and registered: its task is taken below
            adapter = None
        if adapter is None or task is not None:
            adapter = await run_in_threadpool(self.registry.get, self.sources.name(name, source), task)
        return adapter

    async def soft_prompt(self, payload: str, param: str, adapter_param: str, adapter_name: str | None,
                          pickled: bool = False) -> Adapter:
        """The request's own adapter, from the virtual-token embeddings it carries (`payload`: base64
        of a safetensors file; with `pickled`, vLLM's torch.save): decoded, checked and run through the
        model (`adapters.inline`) on the engine thread between steps, so torch's threads stay there,
        with those of the other requests waiting then; held by the request alone, nothing registered
        or stored. InvalidRequest naming `param` for a bad payload, or for one sent with an adapter
        (`adapter_param`, naming `adapter_name`)."""
        if adapter_name not in (None, "", self.base.name):
            raise InvalidRequest(param, f"cannot be combined with {adapter_param} ({adapter_name!r}): a request "
                                 "runs with an adapter or with its own soft prompt, not both")
        decode = inline.decode_torch_save if pickled else inline.decode_safetensors
        limits = (self.base.spec.hidden_size, self.config.max_virtual_tokens, self.config.max_request_bytes)
        try:
            return await self.inline_prefixes.get_async(lambda: decode(payload, *limits))
        except inline.InvalidSoftPrompt as exc:
            raise InvalidRequest(param, str(exc)) from None

    def tokenize(self, text: str) -> list[int]:
        return self.base.tokenizer(text, add_special_tokens=True).input_ids

    async def prepare(self, route: str, prompt, params: SamplingParams, adapter: Adapter | None,
                      truncate: int | None = None, grammar: GrammarSpec | None = None, answers: Answers = ONE) -> Job:
        """Validate one request against the server's limits. `prompt` is text or token ids; long
        texts are tokenized on a worker thread, so they do not hold up the event loop. `adapter`
        (from `self.adapter`): the version the request runs with, whatever is uploaded meanwhile."""
        stops, limit = params.stop, self.config.max_stop_sequences
        if len(stops) > limit:
            raise InvalidRequest("stop", f"{len(stops)} stop sequences is more than the {limit} allowed "
                                 "(--max-stop-sequences)")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidRequest("stop", f"a stop sequence is longer than {MAX_STOP_CHARS} characters")
        if not isinstance(prompt, str):
            ids = list(prompt)
        elif len(prompt) > INLINE_TOKENIZE_CHARS:
            ids = await run_in_threadpool(self.tokenize, prompt)
        else:
            ids = self.tokenize(prompt)
        if truncate is not None:
            ids = ids[-truncate:]
        if not ids:
            bos = self.base.tokenizer.bos_token_id
            if bos is None:
                raise InvalidRequest("inputs", "must not be empty")
            ids = [bos]
        limit = self.config.max_input_tokens
        if len(ids) > limit:
            raise InvalidRequest("inputs", f"{len(ids)} tokens is more than the {limit} allowed (--max-input-tokens)")
        if params.max_new_tokens > self.config.max_new_tokens:
            raise InvalidRequest("max_new_tokens", f"{params.max_new_tokens} is more than the "
                                 f"{self.config.max_new_tokens} allowed (--max-new-tokens)")
        total = len(ids) + params.max_new_tokens + (adapter.prefix_length if adapter else 0)
        positions = self.base.max_positions
        if positions and total > positions:
            raise InvalidRequest("max_new_tokens", f"prompt ({len(ids)}) + virtual tokens + max_new_tokens "
                                 f"= {total} exceeds the model's {positions} positions")
        self.engine.engine.check_fits(adapter.prefix_length if adapter else 0, len(ids), params.max_new_tokens,
                                      answers.generated, answers.param)
        # Compiled here, on a worker thread (the first one also reads the vocabulary): a bad schema is
        # this request's 422, never the engine thread's fault.
        compiled = await asyncio.to_thread(self.grammars.compile, grammar) if grammar is not None else None
        return Job(ids, params, adapter, route, grammar=compiled, answers=answers)

    def start(self, job: Job) -> list[Stream]:
        """Queue the job's answers (`job.answers.generated`, its prompt computed once): a stream each."""
        constraints = [job.grammar.constraint() if job.grammar is not None else None
                       for _ in range(job.answers.generated)]
        return self.engine.generate_answers(job.prompt_ids, job.params, job.adapter, constraints)

    async def collect_all(self, streams: list[Stream], request: Request | None = None) -> list[Result]:
        """Every stream's tokens (a request's answers or prompts); all aborted if one fails or the client goes."""
        try:
            return list(await asyncio.gather(*(self.collect(s, request) for s in streams)))
        finally:
            for s in streams:
                s.abort()

    async def collect(self, stream: Stream, request: Request | None = None) -> Result:
        """All of a request's tokens; aborts it if the client disconnects meanwhile."""

        task = asyncio.ensure_future(stream.result())
        watcher = asyncio.ensure_future(disconnected(request.receive)) if request is not None else None
        try:
            await asyncio.wait({t for t in (task, watcher) if t}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the client went away first
                stream.abort()
                raise ClientGone()
            events = task.result()
        finally:
            for t in (task, watcher):
                if t is not None and not t.done():
                    t.cancel()
        return Result(events, stream.seq)

    def record(self, job: Job, seq: Sequence, answer: int = 0) -> None:
        """Metrics and the one log line of a finished generation request (of each of its answers; the
        prompt's tokens are counted with the first)."""
        now = time.monotonic()
        self.metrics.count_adapter(job.adapter_name, len(seq.output_ids))
        if answer == 0:
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        self.metrics.generated_tokens.inc(len(seq.output_ids))
        self.metrics.latency.observe(now - job.start)
        ttft = (seq.first_token_time - seq.arrival_time) if seq.first_token_time else None
        if ttft is not None:
            self.metrics.ttft.observe(ttft)
        log.info(
            "route=%s adapter=%s adapter_version=%s prompt_tokens=%d generated_tokens=%d finish=%s ttft=%s total=%.3fs",
            job.route, job.adapter_name or "-", job.adapter_version or "-", len(job.prompt_ids), len(seq.output_ids),
            seq.finish_reason.value if seq.finish_reason else "aborted",
            f"{ttft:.3f}s" if ttft is not None else "-", now - job.start,
        )

    def idle(self) -> bool:
        return self.in_flight == 0 and not self.engine.engine.has_work()


def _given_key(request: Request) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY`, or `X-API-Key`."""
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")


async def disconnected(receive) -> None:
    """Return once the client has gone (ASGI's `http.disconnect`)."""
    while (await receive())["type"] != "http.disconnect":
        pass
