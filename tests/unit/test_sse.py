"""`sse._start_now`: a coroutine run at once, finished by a task only if it has to wait."""

from __future__ import annotations

import asyncio

import pytest

from server.api.sse import _start_now


def test_a_coroutine_that_never_waits_is_done_at_once():
    done = []

    async def write():
        done.append(1)

    async def main():
        assert _start_now(write()) is None and done == [1]

    asyncio.run(main())


def test_one_that_waits_is_finished_by_a_task_with_its_result_or_error():
    async def main():
        loop = asyncio.get_running_loop()
        gate, steps = loop.create_future(), []

        async def write(fail: bool):
            steps.append("before")
            await gate
            await asyncio.sleep(0)  # a second wait, on a bare yield
            steps.append("after")
            if fail:
                raise OSError("gone")
            return "written"

        rest = _start_now(write(False))
        failing = _start_now(write(True))
        assert steps == ["before", "before"] and rest is not None
        task, failed = asyncio.ensure_future(rest), asyncio.ensure_future(failing)
        await asyncio.sleep(0.01)
        assert not task.done()
        gate.set_result(None)
        assert await task == "written"
        with pytest.raises(OSError, match="gone"):
            await failed

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_coroutine():
    async def main():
        cleaned = []

        async def write():
            try:
                await asyncio.get_running_loop().create_future()  # never done
            finally:
                cleaned.append(True)

        task = asyncio.ensure_future(_start_now(write()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]

    asyncio.run(main())
