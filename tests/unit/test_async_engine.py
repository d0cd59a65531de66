"""AsyncEngine: each step's tokens reach the event loop in one hand-over, and the engine does not
wait for the loop: a loop that is busy elsewhere does not hold the steps up."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.engine.cpu.threads import ThreadPlan
from server.engine.async_engine import AsyncEngine
from server.engine.request import SamplingParams
from tests.conftest import PROMPTS


def _counting_steps(engine: AsyncEngine, probe) -> list:
    """Record probe() as each step starts."""
    seen, run = [], engine.engine.runner.run

    def recorded(step):
        seen.append(probe())
        return run(step)

    engine.engine.runner.run = recorded
    return seen


def test_a_steps_tokens_reach_the_loop_in_one_hand_over(llama):
    engine = AsyncEngine(llama.engine())
    loop_calls = []

    async def scenario():
        engine.start()
        loop = asyncio.get_running_loop()
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args):
            loop_calls.append(len(args[0]))
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted
        try:
            params = SamplingParams(max_new_tokens=6, ignore_eos=True)
            streams = [engine.generate(llama.ids(p), params) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[0])]
            return [[e.token_id for e in await s.result()] for s in streams]
        finally:
            engine.stop()

    tokens = asyncio.run(scenario())
    assert [len(t) for t in tokens] == [6, 6, 6]
    assert sum(loop_calls) == 18  # every token delivered, ...
    assert len(loop_calls) < 18 and max(loop_calls) == 3  # ... a step's tokens together


@pytest.mark.parametrize("spare", [False, True])
def test_tokens_are_handed_over_as_the_next_layers_start_when_the_loop_has_a_cpu(llama, spare):
    """With CPU to spare for the loop, a step's tokens go over while the next step's forward runs
    (its layers release the GIL), else as the step ends; the last step's go at once either way."""
    engine = AsyncEngine(llama.engine(), ThreadPlan(threads=1, spare=spare))
    runner, forward = engine.engine.runner, engine.engine.runner._forward
    in_forward, handed = [False], []

    def timed(*args):
        in_forward[0] = True
        try:
            return forward(*args)
        finally:
            in_forward[0] = False

    runner._forward = timed

    async def scenario():
        engine.start()
        loop = asyncio.get_running_loop()
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args):
            handed.append((in_forward[0], len(args[0])))
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted
        try:
            params = SamplingParams(max_new_tokens=5, ignore_eos=True)
            streams = [engine.generate(llama.ids(p), params) for p in (PROMPTS[0], PROMPTS[1])]
            return [[e.token_id for e in await s.result()] for s in streams]
        finally:
            engine.stop()

    tokens = asyncio.run(scenario())
    assert [len(t) for t in tokens] == [5, 5] and sum(n for _, n in handed) == 10
    during = [inside for inside, _ in handed]
    assert during == ([True] * (len(handed) - 1) + [False] if spare else [False] * len(handed))


def test_a_busy_event_loop_does_not_hold_the_engine_up(llama):
    engine = AsyncEngine(llama.engine())
    steps = _counting_steps(engine, time.perf_counter)
    busy = 0.5

    async def scenario():
        engine.start()
        try:
            stream = engine.generate(llama.ids(PROMPTS[1]), SamplingParams(max_new_tokens=400, ignore_eos=True))
            await asyncio.sleep(0.05)
            began = time.perf_counter()
            time.sleep(busy)  # the loop runs nothing: no token is delivered meanwhile
            during = sum(began <= t < began + busy for t in steps)
            stream.abort()
            return during
        finally:
            engine.stop()

    during = asyncio.run(scenario())
    assert during >= 20, f"only {during} steps while the loop was busy for {busy} s"
