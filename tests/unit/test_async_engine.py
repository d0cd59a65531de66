"""AsyncEngine on CPU: each step's tokens are delivered on the event loop before the next step starts,
and a loop that is busy elsewhere holds the engine up by at most FLUSH_WAIT_S a step."""

from __future__ import annotations

import asyncio
import time

from server.engine.engine import AsyncEngine
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


def test_each_steps_tokens_reach_the_reader_before_the_next_step(llama):
    engine = AsyncEngine(llama.engine())
    got: list[int] = []
    at_step_start = _counting_steps(engine, lambda: len(got))

    async def scenario():
        engine.start()
        try:
            async for event in engine.generate(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=12, ignore_eos=True)):
                got.append(event.token_id)
        finally:
            engine.stop()

    asyncio.run(scenario())
    assert len(got) == 12
    assert at_step_start == list(range(12))  # step n starts once the reader holds the n tokens before it


def test_a_busy_event_loop_holds_each_step_up_briefly(llama):
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
    assert during >= busy / AsyncEngine.FLUSH_WAIT_S / 4, f"{during} steps while the loop was busy for {busy} s"
