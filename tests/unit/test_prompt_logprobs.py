"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`): kept only for the requests that ask,
over a prompt prefilled in several chunks, equal to PEFT's teacher-forced log-probabilities (the
adapter's virtual tokens before the prompt, not scored); and n sequences forked from one prefill."""

from __future__ import annotations

import math

import pytest

from server.engine.request import SamplingParams, Sequence
from tests.conftest import PROMPTS
from tests.factory import ARCHITECTURES, teacher_forced_logprobs


def _drain(engine) -> None:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 500


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("variant", [None, "prompt", "prefix"])
def test_prompt_logprobs_match_peft_over_chunks(worlds, arch, variant):
    w = worlds.get(arch)
    engine = w.engine(max_prefill_tokens=7)  # PROMPTS[1] (25 tokens) in four chunks
    ids = w.ids(PROMPTS[1])
    assert len(ids) > 14
    asks = engine.submit(Sequence(ids, SamplingParams(max_new_tokens=2, prompt_logprobs=True, top_logprobs=3),
                                  w.adapter(variant)))
    plain = engine.submit(Sequence(w.ids(PROMPTS[0]), SamplingParams(max_new_tokens=2), w.adapter(variant)))
    _drain(engine)
    assert plain.prompt_logprobs == [] and plain.prompt_top == []  # nothing kept for a request that did not ask
    assert len(asks.prompt_logprobs) == len(ids) and asks.prompt_logprobs[0] is None and asks.prompt_top[0] is None
    adapter_dir = w.adapter_dirs[variant] if variant else None
    expected = teacher_forced_logprobs(w.model_dir, adapter_dir, ids[:1], ids[1:])
    assert asks.prompt_logprobs[1:] == pytest.approx(expected, abs=2e-4)
    for token, logprob, top in zip(ids[1:], asks.prompt_logprobs[1:], asks.prompt_top[1:]):
        assert len(top) == 3 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert top[0][1] >= logprob
        if top[0][0] == token:
            assert top[0][1] == logprob  # the same number: is_greedy checks compare them exactly


def test_prompt_logprobs_survive_preemption(llama):
    """A request preempted and computing its prompt again keeps the list it had, scored once."""
    engine = llama.engine(max_prefill_tokens=4)
    ids = llama.ids(PROMPTS[1])
    seq = engine.submit(Sequence(ids, SamplingParams(max_new_tokens=3, prompt_logprobs=True)))
    _drain(engine)
    first = list(seq.prompt_logprobs)
    again = engine.submit(Sequence(ids, SamplingParams(max_new_tokens=3, prompt_logprobs=True)))
    engine.step()
    engine.step()
    engine.scheduler.running.remove(again)  # as a preemption: its KV released, requeued in front
    engine.runner._release([again])
    engine.scheduler.waiting.appendleft(again)
    _drain(engine)
    assert again.prompt_logprobs == first and all(lp is None or math.isfinite(lp) for lp in first)
