"""Several answers to one prompt (n, best_of): the prompt is computed once and its keys and values
forked into each answer; answer i draws as a request of its own with seed + i would, whatever the
batch, through chunked prefill and preemption; abort and failure take the whole group."""

from __future__ import annotations

import pytest

from server.engine.kv_cache import GROWTH_SLOTS, KVPool
from server.engine.request import FinishReason, InvalidRequest, SamplingParams, Sequence
from tests.conftest import PROMPTS
from tests.unit.test_engine import _drain, _others, check_memory
from tests.unit.test_kv_budget import _budget_engine, _run_checked

SAMPLED = dict(do_sample=True, temperature=1.0, top_k=40, ignore_eos=True)
LONG_PROMPT = "the quick brown fox jumps over the lazy dog, twice"


def _group(w, variant, prompt: str, answers: int, max_new_tokens: int = 10, **params) -> Sequence:
    """A request for `answers` answers: the first Sequence, its siblings in `.siblings`."""
    def one():
        return Sequence(w.ids(prompt), SamplingParams(max_new_tokens=max_new_tokens, **params), w.adapter(variant))
    first = one()
    first.siblings = [one() for _ in range(answers - 1)]
    return first


def _alone(w, variant, prompt: str, seed: int, max_new_tokens: int = 10, **params) -> list[int]:
    """One request on its own engine, with `seed`."""
    seq = w.engine().generate(w.ids(prompt), SamplingParams(max_new_tokens=max_new_tokens, seed=seed, **params),
                              w.adapter(variant))
    return seq.output_ids


@pytest.mark.parametrize("variant", [None, "prompt", "prefix", "ptuning-mlp"])
def test_answers_are_seeded_requests_with_the_prompt_computed_once(llama, variant, paths):
    engine = llama.engine(paths=paths)
    first = engine.submit(_group(llama, variant, PROMPTS[1], 4, seed=50, **SAMPLED))
    group = first.group
    steps = _drain(engine)
    assert engine.stats["prefill_tokens"] == len(first.prompt_ids)  # once, not four times
    assert steps == 10 + 1  # the prompt's step samples every first token; the last step releases them
    answers = [s.output_ids for s in group]
    assert [s.seed for s in group] == [50, 51, 52, 53]
    for i, got in enumerate(answers):
        assert got == _alone(llama, variant, PROMPTS[1], 50 + i, **SAMPLED), f"answer {i}"
    assert len({tuple(a) for a in answers}) > 1, "the answers do not differ: the test shows nothing"
    assert all(s.finish_reason == FinishReason.LENGTH for s in group)
    assert engine.runner.pool.held == 0 and not engine.runner.seqs


def test_greedy_answers_are_all_the_greedy_answer(llama):
    engine = llama.engine()
    group = engine.submit(_group(llama, "prefix", PROMPTS[0], 3)).group
    _drain(engine)
    want = llama.reference("prefix", llama.ids(PROMPTS[0]), 10)
    assert [s.output_ids for s in group] == [want] * 3


def test_answers_in_a_busy_batch_and_chunked_prefill_keep_their_tokens(llama):
    engine = llama.engine(max_prefill_tokens=4)
    others = [engine.submit(s) for s in _others(llama)[:2]]
    engine.step()
    first = engine.submit(_group(llama, "ptuning-mlp", LONG_PROMPT, 3, seed=9, **SAMPLED))
    group = first.group
    others += [engine.submit(s) for s in _others(llama)[2:]]
    _drain(engine, on_step=lambda _: check_memory(engine))
    for i, seq in enumerate(group):
        assert seq.output_ids == _alone(llama, "ptuning-mlp", LONG_PROMPT, 9 + i, **SAMPLED), f"answer {i}"
    for seq in others:
        assert seq.output_ids == llama.engine().generate(seq.prompt_ids, seq.params, seq.adapter).output_ids


def _slot_bytes(w) -> int:
    return KVPool.slot_bytes(w.spec.num_layers, w.spec.num_kv_heads, w.spec.head_dim, w.spec.dtype)


def test_forked_answers_survive_preemption(llama):
    """Groups of three short prompts with long answers in a pool that holds three answers whole:
    forked answers are preempted and computed again (their prompt and tokens), as single requests."""
    groups = [_group(llama, v, PROMPTS[0], 3, max_new_tokens=80, seed=100 * i, **SAMPLED)
              for i, v in enumerate(["prompt", None, "prefix", None])]
    members = [m for g in groups for m in g.group]
    engine, budget = _budget_engine(llama, members, requests_that_fit=3)
    _run_checked(engine, groups, budget)
    assert engine.scheduler.preemptions > 0
    assert any(m.preemptions for g in groups for m in members if m is not g)  # a forked sibling too
    for k, g in enumerate(groups):
        seqs = members[3 * k:3 * k + 3]
        variant = g.adapter.name if g.adapter else None
        for i, seq in enumerate(seqs):
            assert seq.finished and not seq.aborted
            assert seq.output_ids == _alone(llama, variant, PROMPTS[0], g.params.seed + i, max_new_tokens=80, **SAMPLED)
    assert engine.runner.pool.held == 0


def test_a_group_preempted_before_its_fork_computes_its_prompt_again(llama):
    """A group still prefilling its prompt (4 tokens a step) is the most recent admission when a
    decoding request's segment must grow: it gives back its own and its siblings' segments, waits, and
    is forked when readmitted; its answers are those it would have had."""
    engine = llama.engine(max_prefill_tokens=4)
    decoding = engine.submit(Sequence(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=80, ignore_eos=True)))
    long_ids = llama.ids(LONG_PROMPT)
    holds = len(decoding.prompt_ids) + GROWTH_SLOTS + 2 * (len(long_ids) + 10) + GROWTH_SLOTS // 2
    engine = llama.engine(max_prefill_tokens=4, kv_cache_bytes=holds * _slot_bytes(llama))
    engine.submit(decoding)
    while len(decoding.output_ids) < GROWTH_SLOTS - 6:
        engine.step()
    group = engine.submit(_group(llama, None, LONG_PROMPT, 2, seed=5, **SAMPLED))
    members = group.group
    engine.step()
    assert all(m.segment is not None for m in members) and not group.output_ids
    _drain(engine, on_step=lambda _: check_memory(engine))
    assert group.preemptions >= 1 and decoding.preemptions == 0
    for i, seq in enumerate(members):
        assert seq.output_ids == _alone(llama, None, LONG_PROMPT, 5 + i, **SAMPLED), f"answer {i}"
    assert engine.runner.pool.held == 0


def test_aborting_before_the_fork_ends_every_answer_and_frees_their_memory(llama):
    engine = llama.engine(max_prefill_tokens=4)
    first = engine.submit(_group(llama, "prefix", LONG_PROMPT, 4, **SAMPLED))
    engine.step()  # part of the prompt: the siblings hold empty segments
    assert first.segment is not None and all(s.segment is not None for s in first.siblings)
    [shared] = engine.runner.pool.prefixes.values()  # the adapter's prefix, once, held by every answer
    assert shared.refs == 4 and all(s.shared_prefix is shared for s in first.group)
    check_memory(engine)
    engine.abort(first)
    _drain(engine)
    assert all(s.aborted and s.finish_reason == FinishReason.ABORT and not s.output_ids for s in first.group)
    assert engine.runner.pool.held == 0 and not engine.runner.seqs and not engine.num_running


def test_a_forked_answer_aborted_alone_leaves_the_others(llama):
    engine = llama.engine()
    first = engine.submit(_group(llama, None, PROMPTS[0], 3, max_new_tokens=8, seed=4, **SAMPLED))
    siblings = list(first.siblings)
    engine.step()  # the fork
    assert all(len(s.output_ids) == 1 for s in first.group) and engine.num_running == 3
    engine.abort(siblings[0])
    _drain(engine)
    assert siblings[0].aborted and len(siblings[0].output_ids) < 8
    assert len(first.output_ids) == len(siblings[1].output_ids) == 8
    assert engine.runner.pool.held == 0


def test_a_failed_step_fails_every_answer(llama, monkeypatch):
    engine = llama.engine()
    told = []
    first = _group(llama, "prompt", PROMPTS[0], 3, **SAMPLED)
    for s in first.group:
        s.on_token = lambda seq, event: told.append((seq.id, event))
    engine.submit(first)
    monkeypatch.setattr(engine.runner, "_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    _drain(engine)
    assert sorted(i for i, _ in told) == sorted(s.id for s in first.group)
    assert all(isinstance(e, Exception) for _, e in told)
    assert engine.runner.pool.held == 0


def test_more_answers_than_fit_are_refused(llama):
    engine = llama.engine(max_batch_size=4)
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(_group(llama, None, PROMPTS[0], 5))
    assert refused.value.param == "n" and "--max-batch-size" in str(refused.value)
    slots = engine.runner.pool.slots
    with pytest.raises(InvalidRequest, match="× 2 answers = .* tokens, more than the KV cache holds"):
        engine.check_fits(0, slots // 2, 10, answers=2)
    engine.check_fits(0, slots // 2 - 10, 10, answers=2)


def test_prompt_logprobs_are_computed_once_and_given_to_every_answer(llama):
    engine = llama.engine(max_prefill_tokens=4)
    first = engine.submit(_group(llama, "prefix", LONG_PROMPT, 2, prompt_logprobs=True, seed=1, **SAMPLED))
    sibling = first.siblings[0]
    _drain(engine)
    assert len(first.prompt_logprobs) == len(first.prompt_ids) and first.prompt_logprobs[1] is not None
    assert sibling.prompt_logprobs == first.prompt_logprobs
    assert sibling.output_ids != first.output_ids
