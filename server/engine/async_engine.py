"""The engine on a background thread, its tokens handed to asyncio: `AsyncEngine` and each request's `Stream`.

`AsyncEngine` steps an `Engine` (engine.py) on its own thread and hands each step's tokens to the
event loop in one message: one wakeup of the loop per step, not one per token. A streaming
response takes its tokens in that callback (`Stream.listen`; server/api/sse.py writes them to the
socket there); any other consumer is woken once, when its request ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Callable, TypeVar

from adapters import Adapter

from .cpu import threads as cpu_threads
from .engine import Delivery, Engine, _call_back
from .request import SamplingParams, Sequence, TokenEvent

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncEngine:
    """Runs an Engine on a background thread; `generate` streams a request's tokens to asyncio.

    Start it from the event loop that consumes the streams: each step's tokens reach that loop
    in one `call_soon_threadsafe`, and every callback of `Sequence.on_token` runs on it.

    The engine does not wait for the loop: on CPU the loop's work for a step (waking the readers,
    writing their chunks) runs while the next step computes, on cores the torch threads fill. The
    CPU kernels share their work out from a counter (csrc/common.cpp), so the other threads take
    over the share of the one the loop preempts. Measured over HTTP on 2 cores, 64 streams, three
    rounds alternating with the engine waiting for the loop to deliver each step before the next:
    base 765-824 against 674-751 tok/s, mixed adapters 717-764 against 647-754.

    When the thread plan leaves CPU for the event loop (`ThreadPlan.spare`), a step's tokens are
    handed over as the next step's layers start (`ModelRunner.on_layers`, the GIL released for
    them), not as the step ends: the loop's work on them (50-100 us of Python per stream) then runs
    beside the layers on its own CPU, instead of while the next step's preparation waits for the
    GIL. Measured on 2 cores, one engine thread, 64 streams, two runs each way (bench.serving's
    step times): the Python of a step 2.7-3.5 ms in the server against 1.7-2.0 in-process when
    tokens go as steps end, 1.6-1.8 against 1.6-1.8 when they go as layers start; steps 5.6-16%
    longer than in-process against 0.7-11.6%. Where the engine's threads take every CPU the loop
    would preempt one of them mid-layer instead, which measured worse (bench/README.md, "Threads
    and cores"), so there tokens go as the step ends. Held tokens reach the loop a millisecond or
    two later; when no step follows, or one runs no layers, at once.
    """

    def __init__(self, engine: Engine, threads: cpu_threads.ThreadPlan | None = None):
        """threads: torch's threads on the engine thread, and the CPUs they are confined to
        (default: as many as the process has, on any CPU)."""
        self.engine = engine
        self.threads = threads
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._between_steps: deque[tuple[Callable, concurrent.futures.Future]] = deque()
        self._closed = False  # the loop has ended: tasks run on their caller's thread
        self._idle = False  # the loop waits for work
        self._round_started = time.monotonic()  # when the loop last came round: woke, or ended a step
        self._hold = bool(threads and threads.spare)  # hand tokens over as the next layers start
        self._held: list[Delivery] = []  # the last step's tokens, until then
        self._released = False  # whether this step's layers have started (and released them)

    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self.engine.emit = self._hand_over
        if self._hold:
            self.engine.runner.on_layers = self._release
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None = None,
                 constraint=None) -> "Stream":
        """Queue a request (Overloaded at once if it cannot be) and return the stream of its tokens.
        constraint: its own `grammar.Constraint` (structured output), or None."""
        return self.generate_answers(prompt_ids, params, adapter, [constraint])[0]

    def generate_answers(self, prompt_ids: list[int], params: SamplingParams, adapter: Adapter | None,
                         constraints: list) -> list["Stream"]:
        """`len(constraints)` answers to one prompt (n, best_of), its prompt computed once: a stream each,
        answer i drawn with the seed + i. constraints: each answer's own `grammar.Constraint`, or None."""
        streams = [Stream(self) for _ in constraints]
        for stream, constraint in zip(streams, constraints):
            stream.seq = Sequence(list(prompt_ids), params, adapter, on_token=stream._push, constraint=constraint)
        streams[0].seq.siblings = [s.seq for s in streams[1:]]
        self.engine.submit(streams[0].seq)
        self.wake()
        return streams

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (False before `start`, after `stop`, or if it died)."""
        return self._thread.is_alive()

    def stalled_seconds(self) -> float:
        """How long requests have waited on the engine thread's current round (a step, and the
        tasks between steps): 0 while it waits for work or has none."""
        with self._wake:
            if self._idle or not self.engine.has_work():
                return 0.0
            return time.monotonic() - self._round_started

    def run_between_steps(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps and return what it returns (blocking
        the caller): model work outside the engine (an adapter's materialization) never runs
        while a step does. Runs `fn` at once on the caller's thread when the engine thread is the
        caller or runs no steps (not started, stopped, or died)."""
        if threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            queued = self._thread.is_alive() and not self._closed
            if queued:
                self._between_steps.append((fn, future))
                self._wake.notify()
        return future.result() if queued else fn()

    def _hand_over(self, deliveries: list[Delivery]) -> None:  # any thread
        if self._hold and threading.current_thread() is self._thread:
            self._held.extend(deliveries)
        else:  # from another thread (aborting everything while draining): at once
            self._send(deliveries)

    def _release(self) -> None:  # engine thread
        self._released = True
        if self._held:
            held, self._held = self._held, []
            self._send(held)

    def _send(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            try:
                self._event_loop.call_soon_threadsafe(_call_back, deliveries)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

    def _loop(self) -> None:
        try:
            self._step_until_stopped()
        finally:  # stopped, or died: tasks queued since the last round run here, later ones on their callers
            with self._wake:
                self._closed = True
                tasks = list(self._between_steps)
                self._between_steps.clear()
            _run_tasks(tasks)

    def _step_until_stopped(self) -> None:
        if self.threads:  # per thread: OpenMP's thread count and workers are the caller's
            cpu_threads.apply(self.threads)
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_work() and not self._between_steps:
                    self._idle = True
                    self._wake.wait()
                self._idle = False
                self._round_started = time.monotonic()
                stopping, tasks = self._stopping, list(self._between_steps)
                self._between_steps.clear()
            if tasks or stopping:  # an adapter's materialization must not hold up the last step's tokens
                self._release()
            _run_tasks(tasks)  # on stop too: their callers are waiting
            if stopping:
                return
            if self.engine.has_work():
                self._released = False
                try:
                    self.engine.step()
                except Exception:  # a failed step must not kill the server; its requests were failed
                    log.exception("engine step failed; failed the requests in the batch")
                if not self._released or not self.engine.has_work():  # no layers ran, or none follow
                    self._release()


def _run_tasks(tasks: list[tuple[Callable, concurrent.futures.Future]]) -> None:
    for fn, future in tasks:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)


class Stream:
    """A request's tokens, on the event loop: `listen` to them as they come (streaming), or
    `await result()` for all of them at the end; the last event has `finish_reason` set.

    Leaving before the end (a client that disconnects) aborts the request, which leaves the
    batch and frees its KV segment at the next step.
    """

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self.events: list[TokenEvent] = []
        self._error: Exception | None = None
        self._ended = asyncio.Event()  # set by the last event or an error
        self._listener: Callable[[TokenEvent | Exception], None] | None = None
        self.seq: Sequence | None = None

    def _push(self, _seq, event) -> None:  # event loop thread
        if isinstance(event, Exception):
            self._error = event
        else:
            self.events.append(event)
        if self._error is not None or event.finish_reason is not None:
            self._ended.set()
        if self._listener is not None:
            self._listener(event)

    def listen(self, listener: Callable[[TokenEvent | Exception], None]) -> None:
        """Call `listener` with each event, those already here first, then each as its step delivers
        it (on the event loop, in the step's callback: it must not block); an error comes last."""
        self._listener = listener
        for event in self.events:
            listener(event)
        if self._error is not None:
            listener(self._error)

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
