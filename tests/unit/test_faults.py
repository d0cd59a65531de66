"""Fault containment in the engine: a failed step fails only what caused it, every request ends
with a final event, and the detokenizer keeps the text exact."""

from __future__ import annotations

import asyncio
import types

import pytest

from server.engine.request import GenerationFailed, SamplingParams, Sequence
from tests.conftest import MAX_NEW, PROMPTS


def _submit(engine, w, variant, prompt, events, max_new_tokens=MAX_NEW):
    seq = Sequence(w.ids(prompt), SamplingParams(max_new_tokens=max_new_tokens), w.adapter(variant),
                   on_token=lambda s, event: events.setdefault(s.id, []).append(event))
    return engine.submit(seq)


def _drain(engine, max_steps=200):
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("the engine does not finish")


def test_a_failing_newcomer_fails_alone_and_the_batch_goes_on(llama, monkeypatch):
    """A newcomer whose prefill raises (a prompt too long for the memory left, say) is failed by
    itself; the step runs again without it, and the running requests never notice."""
    engine = llama.engine()
    events = {}
    running = [_submit(engine, llama, v, PROMPTS[1], events) for v in ("prompt", None)]
    engine.step()
    poison = _submit(engine, llama, "prefix", PROMPTS[0], events)
    forward = engine.runner._forward

    def fails_with_the_poison(batch, tokens, sampling):
        if any(seq is poison for seq in batch):
            raise RuntimeError("out of memory")
        return forward(batch, tokens, sampling)

    monkeypatch.setattr(engine.runner, "_forward", fails_with_the_poison)
    _drain(engine)
    assert poison.aborted and not poison.output_ids
    assert [type(e) for e in events[poison.id]] == [GenerationFailed] and "out of memory" in str(events[poison.id][0])
    for seq, variant in zip(running, ("prompt", None)):
        assert seq.output_ids == llama.reference(variant, llama.ids(PROMPTS[1])), variant
        assert all(not isinstance(e, Exception) for e in events[seq.id])
    assert engine.stats["failed_steps"] == 1 and engine.consecutive_failures == 0  # served the others since
    assert engine.runner.pool.held == 0 and engine.runner.seqs == []


def test_consecutive_failures_are_counted_and_health_says_so(llama, monkeypatch):
    from server.api import routes_ops

    engine = llama.engine()
    events = {}

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "_forward", broken)
    for i in range(routes_ops.UNHEALTHY_AFTER):  # each a newcomer alone: failed by itself, nothing raised
        _submit(engine, llama, None, PROMPTS[0], events)
        engine.step()
    assert engine.consecutive_failures == routes_ops.UNHEALTHY_AFTER == engine.stats["failed_steps"]
    assert all(isinstance(e[-1], RuntimeError) for e in events.values()) and len(events) == 3
    async_engine = types.SimpleNamespace(engine=engine, alive=True, stalled_seconds=lambda: 0.0)  # stepped here
    service = types.SimpleNamespace(draining=False, engine=async_engine)
    request = types.SimpleNamespace(app=types.SimpleNamespace(state=types.SimpleNamespace(service=service)))
    response = asyncio.run(routes_ops.health(request))
    assert response.status_code == 503 and b"device lost" in response.body
    monkeypatch.undo()
    engine.generate(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=2))
    assert engine.consecutive_failures == 0
    assert asyncio.run(routes_ops.health(request)) == {"status": "ok"}


def test_a_request_submitted_while_the_engine_resets_is_kept(llama, monkeypatch):
    """fail_all ends what it saw in one critical section; a request that arrives during the reset
    that follows (another thread) is neither dropped silently nor failed: it runs."""
    engine = llama.engine()
    events = {}
    _submit(engine, llama, None, PROMPTS[0], events)
    engine.step()  # running now: the next step has no newcomers, so its failure fails the batch
    late = []
    reset = engine.runner.reset
    monkeypatch.setattr(engine.runner, "reset", lambda: (late.append(_submit(engine, llama, "prompt", PROMPTS[1], events)),
                                                         reset()))
    monkeypatch.setattr(engine.runner, "_forward", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        engine.step()
    monkeypatch.undo()
    _drain(engine)
    assert late[0].output_ids == llama.reference("prompt", llama.ids(PROMPTS[1]))
    assert events[late[0].id][-1].finish_reason is not None


def test_a_failure_after_the_forward_leaves_the_runner_as_before(llama, monkeypatch):
    """Sampling (or anything after the forward) raising: the running requests keep their segment
    lengths, so the retried step feeds back each token once, and the result equals PEFT's."""
    engine = llama.engine()
    events = {}
    running = _submit(engine, llama, "ptuning-mlp", PROMPTS[1], events)
    engine.step()
    newcomer = _submit(engine, llama, None, PROMPTS[0], events)
    sample = engine.runner._sample
    calls = []

    def fails_once(batch, logits):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("sampling failed")
        return sample(batch, logits)

    monkeypatch.setattr(engine.runner, "_sample", fails_once)
    _drain(engine)
    assert newcomer.aborted and isinstance(events[newcomer.id][-1], GenerationFailed)
    assert running.output_ids == llama.reference("ptuning-mlp", llama.ids(PROMPTS[1]))
    assert engine.runner.pool.held == 0


def test_a_failing_delivery_ends_that_request_alone(llama):
    engine = llama.engine()
    events = {}
    bad = _submit(engine, llama, None, PROMPTS[0], events)
    good = _submit(engine, llama, "prefix", PROMPTS[1], events)
    engine.step()

    def broken(token_id):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    bad.detokenizer.step = broken
    _drain(engine)
    assert bad.aborted and isinstance(events[bad.id][-1], RuntimeError)
    assert good.output_ids == llama.reference("prefix", llama.ids(PROMPTS[1]))
    assert engine.runner.pool.held == 0
