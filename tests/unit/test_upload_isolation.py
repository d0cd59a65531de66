"""An adapter uploaded while the engine serves is materialized on the engine thread, between two
steps: its model forward never overlaps a step's, and its encoders run on the engine thread too (torch
ops on another thread would start a second OpenMP team, which slows every later step)."""

from __future__ import annotations

import asyncio
import threading
import time

from adapters import AdapterRegistry
from server.engine.async_engine import AsyncEngine
from server.engine.request import SamplingParams
from tests.conftest import PROMPTS


def test_materialization_runs_between_steps_on_the_engine_thread(llama, monkeypatch):
    import adapters.loading

    materialize, materialized_on = adapters.loading.materialize, []

    def recorded_materialize(*args, **kwargs):
        materialized_on.append(threading.current_thread().name)
        return materialize(*args, **kwargs)

    monkeypatch.setattr(adapters.loading, "materialize", recorded_materialize)
    engine = AsyncEngine(llama.engine())
    upload_queued = threading.Event()

    def run_between_steps(fn):
        upload_queued.set()
        return engine.run_between_steps(fn)

    registry = AdapterRegistry(llama.spec, llama.model, run_model=run_between_steps)
    spans, forwards = [], []
    run = engine.engine.runner.run

    def timed_run(step):
        if len(spans) == 3:  # hold the batch until the upload waits for it, however fast the steps are
            upload_queued.wait(timeout=60)
        began = time.perf_counter()
        try:
            return run(step)
        finally:
            spans.append((began, time.perf_counter()))

    engine.engine.runner.run = timed_run
    model_forward = type(llama.model).forward

    def recorded_forward(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return model_forward(self, *args, **kwargs)
        finally:
            if kwargs.get("inputs_embeds") is not None:  # materialization (steps pass input_ids)
                forwards.append((began, time.perf_counter(), threading.current_thread().name))

    async def scenario():
        engine.start()
        try:
            params = SamplingParams(max_new_tokens=60, ignore_eos=True)
            streams = [engine.generate(llama.ids(PROMPTS[i % 2]), params) for i in range(8)]
            await asyncio.sleep(0.05)  # the batch is running
            for variant in ("prompt", "ptuning-lstm"):
                config, weights = llama.files(variant)
                await asyncio.to_thread(registry.add, f"up-{variant}", config, weights, "upload", False)
            results = [await s.result() for s in streams]
            assert all(len(r) == 60 for r in results)
        finally:
            engine.stop()

    type(llama.model).forward = recorded_forward
    try:
        asyncio.run(scenario())
    finally:
        type(llama.model).forward = model_forward
    assert len(forwards) == 2 and all(thread == "engine" for *_, thread in forwards)
    assert materialized_on == ["engine", "engine"]  # the LSTM encoder included
    for began, ended, _ in forwards:
        assert not any(b < ended and began < e for b, e in spans), "a materialization overlapped a step"
    assert any(b > forwards[0][1] for b, _ in spans), "the batch went on after the upload"
    up = registry.get("up-prompt")
    again = llama.engine().generate(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=8), up)
    assert again.output_ids == llama.reference("prompt", llama.ids(PROMPTS[0]))[:8]
