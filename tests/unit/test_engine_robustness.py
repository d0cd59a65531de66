"""The engine under faults outside the forward: a scheduler that raises, an engine thread that
dies or stops stepping (and /health saying so), a task queued as the loop stops, a consumer's
callback that raises, and a failed step whose newcomers share it with a chunked prefill."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import types

import pytest

from server.api import routes_ops
from server.engine import engine as engine_module
from server.engine.async_engine import AsyncEngine
from server.engine.request import GenerationFailed, SamplingParams, Sequence, TokenEvent
from tests.conftest import PROMPTS
from tests.unit.test_faults import _drain
from tests.unit.test_faults import _submit as submit


def _submit(engine, w, variant, prompt, events, max_new_tokens=4):  # test_faults' own, with fewer tokens
    return submit(engine, w, variant, prompt, events, max_new_tokens)


async def _health_now(async_engine: AsyncEngine):
    service = types.SimpleNamespace(draining=False, engine=async_engine)
    request = types.SimpleNamespace(app=types.SimpleNamespace(state=types.SimpleNamespace(service=service)))
    response = await routes_ops.health(request)
    return (200, response) if isinstance(response, dict) else (response.status_code, response.body.decode())


def _broken_scheduler(engine):
    def schedule():
        raise RuntimeError("scheduler broke")

    engine.scheduler.schedule = schedule


# ---- a scheduler that raises ----------------------------------------------------------------------

def test_a_failing_scheduler_fails_the_requests_and_counts(llama):
    engine = llama.engine()
    events = {}
    seq = _submit(engine, llama, None, PROMPTS[0], events)
    _broken_scheduler(engine)
    with pytest.raises(RuntimeError, match="scheduler broke"):
        engine.step()
    assert isinstance(events[seq.id][-1], GenerationFailed) and "scheduler broke" in str(events[seq.id][-1])
    assert not engine.has_work()  # nothing left to spin on
    assert engine.stats["failed_steps"] == engine.consecutive_failures == 1
    assert "scheduler broke" in engine.last_failure


def test_an_async_engine_whose_scheduler_raises_fails_each_request_and_health_says_503(llama):
    engine = AsyncEngine(llama.engine())
    _broken_scheduler(engine.engine)

    async def scenario():
        engine.start()
        try:
            for _ in range(routes_ops.UNHEALTHY_AFTER):
                stream = engine.generate(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=2))
                with pytest.raises(GenerationFailed, match="scheduler broke"):
                    await asyncio.wait_for(stream.result(), timeout=10)
            return await _health_now(engine)
        finally:
            engine.stop()

    status, body = asyncio.run(scenario())
    assert status == 503 and "scheduler broke" in body
    assert engine.engine.stats["failed_steps"] == routes_ops.UNHEALTHY_AFTER


# ---- /health: a dead engine thread, an engine that stops stepping ----------------------------------

def test_health_is_503_when_the_engine_thread_has_died(llama):
    engine = AsyncEngine(llama.engine())

    async def scenario():
        engine.start()
        try:
            assert (await _health_now(engine))[0] == 200

            def broken():
                raise RuntimeError("the loop broke")

            engine.engine.has_work = broken  # read by the loop as it wakes: the thread dies
            engine.wake()
            engine._thread.join(timeout=10)
            assert not engine._thread.is_alive()
            return await _health_now(engine)
        finally:
            engine.stop()

    status, body = asyncio.run(scenario())
    assert status == 503 and "engine thread" in body


def test_health_is_503_while_work_waits_and_no_step_ends(llama, monkeypatch):
    monkeypatch.setattr(routes_ops, "STALLED_AFTER", 0.3)
    engine = AsyncEngine(llama.engine())
    started, go_on = threading.Event(), threading.Event()
    run = engine.engine.runner.run

    def stuck(step):
        started.set()
        assert go_on.wait(timeout=30)
        return run(step)

    engine.engine.runner.run = stuck

    async def scenario():
        engine.start()
        try:
            await asyncio.sleep(0.5)  # idle for longer than the threshold: that is no stall
            stream = engine.generate(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=2))
            fresh = await _health_now(engine)  # the work has just come: no stall yet
            assert await asyncio.to_thread(started.wait, 10)
            await asyncio.sleep(0.5)
            stalled = await _health_now(engine)
            go_on.set()
            await asyncio.wait_for(stream.result(), timeout=10)
            return fresh, stalled, await _health_now(engine)
        finally:
            go_on.set()
            engine.stop()

    fresh, stalled, after = asyncio.run(scenario())
    assert fresh == (200, {"status": "ok"})
    assert stalled[0] == 503 and "no engine step" in stalled[1]
    assert after == (200, {"status": "ok"})


# ---- run_between_steps as the loop stops ------------------------------------------------------------

def test_a_task_queued_after_the_loops_last_drain_still_resolves(llama):
    """The loop takes its last tasks, then finishes stopping: a task queued in between (the thread
    still alive) is run or failed, never left waiting for ever."""
    engine = AsyncEngine(llama.engine())
    release = engine._release
    caller, result = [], []

    def queue_a_task_while_stopping():  # on the engine thread, after the last drain
        release()
        if engine._stopping and not caller:
            t = threading.Thread(target=lambda: result.append(engine.run_between_steps(lambda: "ran")))
            caller.append(t)
            t.start()
            deadline = time.monotonic() + 2
            while not engine._between_steps and t.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)

    engine._release = queue_a_task_while_stopping

    async def scenario():
        engine.start()
        engine.stop()

    asyncio.run(scenario())
    assert caller, "the loop did not stop through _release"
    caller[0].join(timeout=5)
    assert not caller[0].is_alive(), "run_between_steps never returned"
    assert result == ["ran"]


def test_tasks_queued_before_the_stop_run_on_the_engine_thread(llama):
    engine = AsyncEngine(llama.engine())
    ran_on = []

    async def scenario():
        engine.start()
        try:
            return await asyncio.to_thread(engine.run_between_steps,
                                           lambda: ran_on.append(threading.current_thread().name) or 7)
        finally:
            engine.stop()

    assert asyncio.run(scenario()) == 7 and ran_on == ["engine"]


# ---- a delivery callback that raises -----------------------------------------------------------------

def test_a_raising_callback_does_not_drop_the_others(llama, caplog):
    got = []

    def broken(seq, event):
        raise ValueError("consumer broke")

    seqs = [Sequence([1], SamplingParams(), on_token=broken)] + [
        Sequence([1], SamplingParams(), on_token=lambda seq, event: got.append((seq.id, event))) for _ in range(2)]
    event = TokenEvent(5, "x", -0.1, False, None)
    with caplog.at_level(logging.ERROR, logger=engine_module.__name__):
        engine_module._call_back([(seq, event) for seq in seqs])
    assert got == [(seqs[1].id, event), (seqs[2].id, event)]
    assert "consumer broke" in caplog.text


def test_a_stream_whose_listener_raises_leaves_the_others_whole(llama):
    engine = AsyncEngine(llama.engine())
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)

    async def scenario():
        engine.start()
        try:
            bad = engine.generate(llama.ids(PROMPTS[0]), params)  # first in every step's deliveries
            bad.listen(lambda event: 1 / 0)
            good = engine.generate(llama.ids(PROMPTS[1]), params)
            return await asyncio.wait_for(good.result(), timeout=10), await asyncio.wait_for(bad.result(), timeout=10)
        finally:
            engine.stop()

    good, bad = asyncio.run(scenario())
    assert len(good) == len(bad) == 5 and good[-1].finish_reason is not None


# ---- a failed step: newcomers alone are dropped, a chunked prefill goes on ----------------------------

def _poisoned(engine, poison, also=lambda batch: False):
    """Make the forward raise whenever `poison` is in its batch (or `also(batch)`); the batches that raised."""
    forward, failed = engine.runner._forward, []

    def forward_or_fail(batch, tokens, sampling):
        if any(seq is poison for seq in batch) or also(batch):
            failed.append([(seq, seq.computed) for seq in batch])
            raise RuntimeError("out of memory")
        return forward(batch, tokens, sampling)

    engine.runner._forward = forward_or_fail
    return failed


def test_a_chunked_prefill_survives_a_step_failed_by_a_newcomer(llama):
    engine = llama.engine(max_prefill_tokens=16)
    events = {}
    decoding = _submit(engine, llama, "prompt", PROMPTS[0], events)
    long = _submit(engine, llama, "prefix", PROMPTS[1], events)
    assert len(long.prompt_ids) > 16
    engine.step()  # decoding's prompt, the first chunk of long's
    assert decoding.output_ids and 0 < long.computed < len(long.prompt_ids)
    poison = _submit(engine, llama, None, PROMPTS[0], events)
    failed = _poisoned(engine, poison)
    _drain(engine)
    assert len(failed) == 1 and {seq for seq, _ in failed[0]} == {decoding, long, poison}
    assert dict(failed[0])[long] > 0  # long was half-way through its prompt in the step that failed
    assert poison.aborted and [type(e) for e in events[poison.id]] == [GenerationFailed]
    assert long.output_ids == llama.reference("prefix", llama.ids(PROMPTS[1]), 4)
    assert decoding.output_ids == llama.reference("prompt", llama.ids(PROMPTS[0]), 4)
    assert not any(isinstance(e, Exception) for s in (long, decoding) for e in events[s.id])
    assert engine.stats["failed_steps"] == 1 and engine.runner.pool.held == 0


def test_a_step_that_fails_again_without_its_newcomers_fails_everything(llama):
    engine = llama.engine(max_prefill_tokens=16)
    events = {}
    long = _submit(engine, llama, None, PROMPTS[1], events)
    engine.step()
    poison = _submit(engine, llama, None, PROMPTS[0], events)
    failed = _poisoned(engine, poison, also=lambda batch: long in batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    assert len(failed) == 2 and [seq for seq, _ in failed[1]] == [long]  # the rerun: long alone
    assert all(isinstance(events[s.id][-1], GenerationFailed) for s in (long, poison))
    assert not engine.has_work() and engine.runner.pool.held == 0
    assert engine.stats["failed_steps"] == 2
