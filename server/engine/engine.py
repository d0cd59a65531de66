"""The step loop: `scheduler.schedule()` -> `runner.run(step)` -> deliver each token.

`Engine` is synchronous and single-threaded in its stepping; `AsyncEngine` runs it on a
background thread and hands tokens to asyncio consumers as they are sampled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter

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
        for out in outputs:
            self._deliver(out)
        return outputs

    def abort_all(self, error: Exception) -> None:
        """From any thread: end every request with `error`; their KV segments are freed at the next step."""
        with self._lock:
            seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
        for seq in seqs:
            if not seq.finished and not seq.aborted:
                seq.aborted = True
                if seq.on_token:
                    seq.on_token(seq, error)

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

    def _deliver(self, out: StepOutput) -> None:
        seq = out.seq
        if seq.aborted or seq.finished:
            return
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
        if seq.on_token:
            event = TokenEvent(out.token_id, text, out.logprob, out.token_id in self.special_ids, seq.finish_reason)
            seq.on_token(seq, event)

    def _finish_reason(self, seq: Sequence, token_id: int, new_chars: int) -> FinishReason | None:
        if token_id in self.eos_ids and not seq.params.ignore_eos:
            return FinishReason.EOS
        for stop in seq.params.stop:
            if stop in seq.text[-(len(stop) + new_chars):]:
                return FinishReason.STOP
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        return None


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
    """Runs an Engine on a background thread; `generate` streams a request's tokens to asyncio."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None = None) -> "Stream":
        """Queue a request (Overloaded at once if it cannot be) and return the stream of its tokens."""
        stream = Stream(self)
        stream.seq = self.engine.submit(Sequence(list(prompt_ids), params, adapter, on_token=stream._put))
        self.wake()
        return stream

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

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
    """A request's tokens as an async iterator; the last event has `finish_reason` set.

    Closing it early (a client that disconnects) aborts the request, which leaves the batch and
    frees its KV segment at the next step.
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.seq: Sequence | None = None

    def _put(self, _seq, event) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def __aiter__(self):
        return self._events()

    async def _events(self):
        try:
            while True:
                event = await self._queue.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.abort()

    def abort(self) -> None:
        if not self.seq.finished:
            self._engine.engine.abort(self.seq)
            self._engine.wake()
