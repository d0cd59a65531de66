"""The KV pool under a memory budget: admission within it, preemption instead of failure (the
preempted request computed again, its output unchanged), and requests that can never fit refused."""

from __future__ import annotations

import pytest

from server.engine.kv_cache import GROWTH_SLOTS, KVPool, most_slots
from server.engine.request import InvalidRequest, SamplingParams, Sequence
from tests.conftest import MAX_NEW, PROMPTS
from tests.unit.test_engine import _drain, check_memory

VARIANTS = [None, "prompt", "prefix", "ptuning-mlp", "prefix-proj", "ptuning-lstm"]
LONG = GROWTH_SLOTS + 8  # generated tokens: past the first growth, so running requests must grow
SEEDED = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)


def _requests(w, params_for) -> list[Sequence]:
    """24 requests: every adapter kind and no adapter, both prompt lengths, twice."""
    return [Sequence(w.ids(PROMPTS[i % 2]), params_for(i), w.adapter(VARIANTS[i % len(VARIANTS)]))
            for i in range(24)]


def _budget_engine(w, seqs: list[Sequence], requests_that_fit: int):
    """An engine whose KV pool holds `requests_that_fit` of the largest request, whole."""
    spec = w.spec
    slots = requests_that_fit * max(most_slots(s) for s in seqs)
    slot_bytes = KVPool.slot_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
    return w.engine(kv_cache_bytes=slots * slot_bytes), slots * slot_bytes


def _run_checked(engine, seqs: list[Sequence], budget: int) -> dict[int, list]:
    """Submit all, step to the end checking the memory bound at every step; each request's deliveries."""
    delivered = {s.id: [] for s in seqs}
    for s in seqs:
        s.on_token = lambda seq, event: delivered[seq.id].append(event)
        engine.submit(s)
    pool = engine.runner.pool

    def bounded(_step):
        assert pool.nbytes() <= budget and pool.held <= pool.slots
        check_memory(engine)

    _drain(engine, max_steps=2000, on_step=bounded)
    return delivered


def _alone(w, seq: Sequence) -> list[int]:
    return w.engine().generate(seq.prompt_ids, seq.params, seq.adapter).output_ids


def test_24_mixed_requests_in_a_budget_of_3_complete_with_their_own_tokens(llama):
    seqs = _requests(llama, lambda i: SamplingParams(max_new_tokens=LONG))
    engine, budget = _budget_engine(llama, seqs, requests_that_fit=3)
    delivered = _run_checked(engine, seqs, budget)
    assert engine.scheduler.preemptions > 0 and sum(s.preemptions for s in seqs) == engine.scheduler.preemptions
    assert all(s.finished and not s.aborted for s in seqs)
    alone = {}
    for s in seqs:
        key = (s.adapter.name if s.adapter else None, tuple(s.prompt_ids))
        if key not in alone:
            alone[key] = _alone(llama, s)
            assert alone[key][:MAX_NEW] == llama.reference(key[0], s.prompt_ids), key
        assert s.output_ids == alone[key], (key, s.preemptions)
        # each token delivered once, in order, whatever the preemptions
        assert [e.token_id for e in delivered[s.id]] == s.output_ids
        assert "".join(e.text for e in delivered[s.id]) == s.text
        assert [e.finish_reason is not None for e in delivered[s.id]] == [False] * (LONG - 1) + [True]
    assert engine.runner.pool.held == 0 and engine.runner.seqs == []


def test_seeded_sampling_through_preemptions_gives_the_same_tokens(llama):
    seqs = _requests(llama, lambda i: SamplingParams(max_new_tokens=LONG, seed=1000 + i, **SEEDED))
    engine, budget = _budget_engine(llama, seqs, requests_that_fit=3)
    _run_checked(engine, seqs, budget)
    preempted = [s for s in seqs if s.preemptions]
    assert preempted, "nothing was preempted: the test proves nothing"
    for s in seqs:
        assert s.output_ids == _alone(llama, s), s.preemptions


def test_a_request_larger_than_the_whole_budget_is_refused_at_once(llama):
    ids = llama.ids(PROMPTS[1])
    engine, _ = _budget_engine(llama, [Sequence(ids, SamplingParams(max_new_tokens=20))], requests_that_fit=1)
    slots = engine.runner.pool.slots
    with pytest.raises(InvalidRequest, match=rf"prompt \({len(ids)}\) \+ max_new_tokens \(21\) = {len(ids) + 21} "
                                             rf"tokens, more than the KV cache holds \({slots} tokens"):
        engine.submit(Sequence(ids, SamplingParams(max_new_tokens=21)))
    with pytest.raises(InvalidRequest, match=r"virtual tokens \(5\)"):
        engine.submit(Sequence(ids, SamplingParams(max_new_tokens=20), llama.adapter("prompt")))
    assert not engine.has_work()
    done = engine.generate(ids, SamplingParams(max_new_tokens=20))  # exactly the budget: served
    assert len(done.output_ids) == 20 and engine.scheduler.preemptions == 0


def test_admission_waits_for_room_instead_of_overfilling(llama):
    """Requests that together need more than the pool are admitted as room frees up, in order."""
    ids = llama.ids(PROMPTS[1])
    seqs = [Sequence(ids, SamplingParams(max_new_tokens=8)) for _ in range(6)]
    engine, budget = _budget_engine(llama, seqs, requests_that_fit=2)
    for s in seqs:
        engine.submit(s)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 4
    _drain(engine, on_step=lambda _: check_memory(engine))
    assert engine.scheduler.preemptions == 0  # everything fitted whole: nothing to take back
    assert all(s.output_ids == seqs[0].output_ids for s in seqs)
    assert sorted(s.first_token_time for s in seqs) == [s.first_token_time for s in seqs]  # first come, first served
