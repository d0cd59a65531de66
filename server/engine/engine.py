"""The step loop: `scheduler.schedule()` -> `runner.run(step)` -> deliver the step's tokens.

`Engine` is synchronous and single-threaded in its stepping; `AsyncEngine` runs it on a
background thread and hands each step's tokens to asyncio in one message: one wakeup of the
event loop per step, not one per token, and a request's consumer is woken only when it reads
every token (streaming) or when the request ends (everything else).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from typing import Callable

from adapters import Adapter, ModelSpec

from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, StepOutput
from .request import FinishReason, Overloaded, SamplingParams, Sequence, TokenEvent
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, tokenizer, spec: ModelSpec, max_batch_size: int = 64, max_waiting: int = 256,
                 max_prefill_tokens: int = 4096):
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, spec)
        self.scheduler = Scheduler(max_batch_size, max_waiting, max_prefill_tokens)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)
        self._lock = threading.Lock()  # guards the scheduler's queues between submitters and the stepper
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.accepting = True
        self.stats = Counter()  # steps, prefill_tokens, requests_finished
        self.last_batch_size = 0
        self.emit: Callable[[list[Delivery]], None] = _call_back  # AsyncEngine: one hand-over per step

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request; raises Overloaded when the queue is full or the engine is stopping."""
        if not self.accepting:
            raise Overloaded("the server is shutting down", retry_after=5)
        if seq.params.seed is not None:
            seq.seed = seq.params.seed
        else:
            seq.seed = random.getrandbits(63)
        self._detokenizers[seq.id] = IncrementalDetokenizer(self.tokenizer)
        try:
            with self._lock:
                self.scheduler.add(seq)
        except Overloaded:
            del self._detokenizers[seq.id]
            raise
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request from any thread: it leaves the batch at the next step and frees its KV segment."""
        seq.aborted = True

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def step(self) -> list[StepOutput]:
        with self._lock:
            step = self.scheduler.schedule()
        for seq in step.release:
            self._detokenizers.pop(seq.id, None)
        try:
            outputs = self.runner.run(step)
        except Exception as exc:
            self.fail_all(RuntimeError(f"generation failed: {exc}"))
            raise
        self.stats["steps"] += 1
        self.stats["prefill_tokens"] += sum(s.prefill_tokens for s in step.prefill)
        self.last_batch_size = len(outputs)
        self.emit([d for d in map(self._deliver, outputs) if d is not None])
        return outputs

    def abort_all(self, error: Exception) -> None:
        """From any thread: end every request with `error`; their KV segments are freed at the next step."""
        with self._lock:
            seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
        ended = []
        for seq in seqs:
            if not seq.finished and not seq.aborted:
                seq.aborted = True
                ended.append((seq, error))
        self.emit(ended)

    def fail_all(self, error: Exception) -> None:
        """After a failed step, on the stepping thread: end every request and start from an empty batch."""
        self.abort_all(error)
        with self._lock:
            self.scheduler.running.clear()
            self.scheduler.waiting.clear()
        self.runner.reset()
        self._detokenizers.clear()

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None = None) -> Sequence:
        """Run one request to the end on this thread (tests, benchmarks, the single-request path)."""
        seq = self.submit(Sequence(list(prompt_ids), params, adapter))
        while not seq.finished:
            self.step()
        return seq

    def _deliver(self, out: StepOutput) -> Delivery | None:
        """Record the token on its request; what its consumer is to be told, if it has one."""
        seq = out.seq
        if seq.aborted or seq.finished:
            return None
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(out.token_id)
        seq.logprobs.append(out.logprob)
        detok = self._detokenizers.get(seq.id)
        text = detok.step(seq.output_ids) if detok else ""
        seq.text += text
        seq.finish_reason = self._finish_reason(seq, out.token_id, len(text))
        if seq.finished:
            seq.finish_time = now
            self.stats["requests_finished"] += 1
        if seq.on_token is None:
            return None
        return seq, TokenEvent(out.token_id, text, out.logprob, out.token_id in self.special_ids, seq.finish_reason)

    def _finish_reason(self, seq: Sequence, token_id: int, new_chars: int) -> FinishReason | None:
        if token_id in self.eos_ids and not seq.params.ignore_eos:
            return FinishReason.EOS
        for stop in seq.params.stop:
            if stop in seq.text[-(len(stop) + new_chars):]:
                return FinishReason.STOP
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        return None


Delivery = tuple[Sequence, "TokenEvent | Exception"]  # a request's token, or the error that ended it


def _call_back(deliveries: list[Delivery]) -> None:
    for seq, event in deliveries:
        seq.on_token(seq, event)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class AsyncEngine:
    """Runs an Engine on a background thread; `generate` streams a request's tokens to asyncio.

    Start it from the event loop that consumes the streams: each step's tokens reach that loop
    in one `call_soon_threadsafe`, and every callback of `Sequence.on_token` runs on it.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self.engine.emit = self._hand_over
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None = None) -> "Stream":
        """Queue a request (Overloaded at once if it cannot be) and return the stream of its tokens."""
        stream = Stream(self)
        stream.seq = self.engine.submit(Sequence(list(prompt_ids), params, adapter, on_token=stream._push))
        self.wake()
        return stream

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def _hand_over(self, deliveries: list[Delivery]) -> None:  # any thread, once per step
        if deliveries:
            try:
                self._event_loop.call_soon_threadsafe(_call_back, deliveries)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.engine.step()
            except Exception:  # a failed step must not kill the server; its requests were failed
                log.exception("engine step failed; failed the requests in the batch")


class Stream:
    """A request's tokens, on the event loop: `async for` them as they come (streaming), or
    `await result()` for all of them at the end; the last event has `finish_reason` set.

    Leaving either early (a client that disconnects) aborts the request, which leaves the batch
    and frees its KV segment at the next step.
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self.events: list[TokenEvent] = []
        self._error: Exception | None = None
        self._arrived = asyncio.Event()  # set on every delivery: wakes only a reader waiting on it
        self._ended = asyncio.Event()  # set by the last event or an error
        self.seq: Sequence | None = None

    def _push(self, _seq, event) -> None:  # event loop thread
        if isinstance(event, Exception):
            self._error = event
        else:
            self.events.append(event)
        if self._error is not None or event.finish_reason is not None:
            self._ended.set()
        self._arrived.set()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        read = 0
        try:
            while True:
                while read < len(self.events):
                    event = self.events[read]
                    read += 1
                    yield event
                    if event.finish_reason is not None:
                        return
                if self._error is not None:
                    raise self._error
                self._arrived.clear()
                await self._arrived.wait()
        finally:
            self.abort()

    async def result(self) -> list[TokenEvent]:
        """Every event, once the request has ended (raises the error that ended it)."""
        try:
            await self._ended.wait()
        finally:
            self.abort()
        if self._error is not None:
            raise self._error
        return self.events

    def abort(self) -> None:
        if not self.seq.finished:
            self._engine.engine.abort(self.seq)
            self._engine.wake()
