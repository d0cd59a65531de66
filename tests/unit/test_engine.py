"""The continuous-batching engine: mixed batches equal single requests and PEFT, seeded sampling
is independent of the batch, abort, queue limits, batch size and prefill budget, finish reasons,
and memory returned."""

from __future__ import annotations

import pytest

from server.engine.request import FinishReason, InvalidRequest, Overloaded, SamplingParams, Sequence
from tests.conftest import MAX_NEW, PROMPTS
from tests.factory import ARCHITECTURES

SEEDED = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=1234, ignore_eos=True)  # all MAX_NEW tokens compared

# (variant, prompt index, max_new_tokens) in three waves: short prompts first, then longer prompts
# join a running batch (its window must grow to the left), then the rest.
WAVES = [
    [(None, 0, MAX_NEW), ("prompt", 0, 7), ("prefix-proj", 0, MAX_NEW)],
    [("ptuning-mlp", 1, MAX_NEW), ("prefix", 1, 4), (None, 1, 7), ("ptuning-lstm", 0, MAX_NEW)],
    [("prompt", 1, MAX_NEW), ("prefix", 0, 7), ("ptuning-lstm", 1, 4), ("prefix-proj", 1, MAX_NEW),
     ("ptuning-mlp", 0, MAX_NEW)],
]


def _drain(engine, max_steps: int = 500, on_step=None) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        if on_step:
            on_step(steps)
        assert steps < max_steps, "the engine does not finish"
    return steps


def _seq(w, variant, prompt, max_new_tokens=MAX_NEW, **params) -> Sequence:
    ids = w.ids(prompt) if isinstance(prompt, str) else prompt
    return Sequence(ids, SamplingParams(max_new_tokens=max_new_tokens, **params), w.adapter(variant))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_batch_equals_alone_and_peft(worlds, arch, paths):
    w = worlds.get(arch)
    engine = w.engine(max_batch_size=16, paths=paths)
    submitted: list[tuple[Sequence, str | None, int]] = []
    max_rows = 0
    for i, wave in enumerate(WAVES):
        for variant, p, n in wave:
            seq = engine.submit(_seq(w, variant, PROMPTS[p], n))
            submitted.append((seq, variant, p))
        for _ in range(3 if i < len(WAVES) - 1 else 0):
            engine.step()
            max_rows = max(max_rows, len(engine.runner.seqs))

    def track(_):
        nonlocal max_rows
        max_rows = max(max_rows, len(engine.runner.seqs))
        check_memory(engine)

    _drain(engine, on_step=track)
    assert max_rows >= 6, "the requests did not share batches"
    alone_engine = w.engine(paths=paths)
    for seq, variant, p in submitted:
        ids = w.ids(PROMPTS[p])
        alone = alone_engine.generate(ids, SamplingParams(max_new_tokens=seq.params.max_new_tokens),
                                      w.adapter(variant))
        label = f"{arch}/{variant}/prompt {p}/max {seq.params.max_new_tokens}"
        assert seq.finished, label
        assert seq.output_ids == alone.output_ids, label
        assert seq.logprobs == pytest.approx(alone.logprobs, abs=1e-4), label
        # greedy decoding is prefix-closed: fewer new tokens give the first tokens of PEFT's answer
        assert seq.output_ids == w.reference(variant, ids)[: seq.params.max_new_tokens], label
    assert len(engine.runner.seqs) == 0
    assert engine.num_running == engine.num_waiting == 0
    assert engine.stats["requests_finished"] == len(submitted)


# --- seeded sampling ------------------------------------------------------------------------------


def _others(w) -> list[Sequence]:
    """Five requests of every kind, some sampled with their own seeds, some greedy."""
    return [
        _seq(w, None, PROMPTS[1]),
        _seq(w, "prefix", PROMPTS[0], do_sample=True, seed=7),
        _seq(w, "ptuning-mlp", PROMPTS[1], temperature=1.3, top_k=50, seed=99),
        _seq(w, "ptuning-lstm", "A somewhat longer prompt than the others, to pad"),
        _seq(w, "prefix-proj", PROMPTS[0], do_sample=True, top_p=0.5, seed=3),
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_seeded_sampling_is_independent_of_the_batch(worlds, arch):
    w = worlds.get(arch)
    target = ("prompt", PROMPTS[1])

    alone = w.engine().generate(w.ids(target[1]), SamplingParams(max_new_tokens=MAX_NEW, **SEEDED), w.adapter(target[0]))
    assert len(alone.output_ids) == MAX_NEW

    # with five others, all at once
    engine = w.engine()
    others = [engine.submit(s) for s in _others(w)[:3]]
    seq = engine.submit(_seq(w, *target, **SEEDED))
    others += [engine.submit(s) for s in _others(w)[3:]]
    _drain(engine)
    assert seq.output_ids == alone.output_ids
    assert seq.logprobs == pytest.approx(alone.logprobs, abs=1e-4)

    # submitted mid-way into a running batch
    engine = w.engine()
    others = [engine.submit(s) for s in _others(w)]
    for _ in range(3):
        engine.step()
    seq = engine.submit(_seq(w, *target, **SEEDED))
    _drain(engine)
    assert seq.output_ids == alone.output_ids

    # first, with the others joining and leaving around it
    engine = w.engine(max_batch_size=4)
    seq = engine.submit(_seq(w, *target, **SEEDED))
    engine.step()
    for s in _others(w):
        engine.submit(s)
        engine.step()
    _drain(engine)
    assert seq.output_ids == alone.output_ids
    assert seq.seed == 1234
    assert len(engine.runner.seqs) == 0


def test_seeds_matter_and_sampling_differs_from_greedy(llama):
    """Sanity: the seeded test above would notice a sampler that ignored its generator."""
    engine = llama.engine()
    ids = llama.ids(PROMPTS[1])
    runs = {
        seed: tuple(engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW, **(SEEDED | {"seed": seed})),
                                    llama.adapter("prompt")).output_ids)
        for seed in (1, 2, 3, 1234)
    }
    assert len(set(runs.values())) >= 3
    greedy = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW), llama.adapter("prompt")).output_ids
    assert tuple(greedy) != runs[1234]


def test_unseeded_requests_draw_their_own_seed(llama):
    engine = llama.engine()
    a = engine.submit(_seq(llama, None, PROMPTS[0], do_sample=True))
    b = engine.submit(_seq(llama, None, PROMPTS[0], do_sample=True))
    assert a.seed != b.seed
    _drain(engine)


# --- abort ----------------------------------------------------------------------------------------


def test_abort_running_request(llama):
    engine = llama.engine()
    specs = [("prompt", PROMPTS[1]), ("prefix", PROMPTS[0]), (None, PROMPTS[1]), ("ptuning-mlp", PROMPTS[0])]
    seqs = [engine.submit(_seq(llama, v, p)) for v, p in specs]
    engine.step()
    engine.step()
    assert len(engine.runner.seqs) == 4 and engine.num_running == 4
    victim = seqs[1]  # not the last row: the last one moves into its place
    produced = len(victim.output_ids)
    assert produced == 2
    engine.abort(victim)
    engine.step()
    assert len(engine.runner.seqs) == 3
    assert victim not in engine.runner.seqs
    assert engine.num_running == 3
    _drain(engine)
    assert len(victim.output_ids) == produced, "an aborted request kept generating"
    for seq, (variant, prompt) in zip(seqs, specs):
        if seq is not victim:
            assert seq.output_ids == llama.reference(variant, llama.ids(prompt)), variant
    assert len(engine.runner.seqs) == 0


def test_abort_last_row_and_all_rows(llama):
    engine = llama.engine()
    seqs = [engine.submit(_seq(llama, v, PROMPTS[0])) for v in ("prefix", "prompt", None)]
    engine.step()
    engine.abort(seqs[2])
    engine.step()
    assert len(engine.runner.seqs) == 2
    for s in seqs[:2]:
        engine.abort(s)
    engine.step()
    assert len(engine.runner.seqs) == 0 and not engine.has_work()
    # the engine is usable afterwards, and correct
    ids = llama.ids(PROMPTS[1])
    seq = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW), llama.adapter("ptuning-lstm"))
    assert seq.output_ids == llama.reference("ptuning-lstm", ids)


def test_abort_waiting_request(llama):
    engine = llama.engine(max_batch_size=1)
    first = engine.submit(_seq(llama, "prompt", PROMPTS[0]))
    waiting = engine.submit(_seq(llama, "prefix", PROMPTS[1]))
    third = engine.submit(_seq(llama, None, PROMPTS[0]))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 2
    engine.abort(waiting)
    engine.step()
    assert engine.num_waiting == 1, "an aborted waiting request is still queued"
    _drain(engine)
    assert waiting.output_ids == []
    assert first.output_ids == llama.reference("prompt", llama.ids(PROMPTS[0]))
    assert third.output_ids == llama.reference(None, llama.ids(PROMPTS[0]))
    assert len(engine.runner.seqs) == 0


# --- limits ---------------------------------------------------------------------------------------


def test_queue_full_raises_overloaded(llama):
    engine = llama.engine(max_waiting=2)
    a = engine.submit(_seq(llama, "prompt", PROMPTS[0]))
    b = engine.submit(_seq(llama, None, PROMPTS[1]))
    with pytest.raises(Overloaded, match="queue is full"):
        engine.submit(_seq(llama, "prefix", PROMPTS[0]))
    assert engine.num_waiting == 2
    assert list(engine.scheduler.waiting) == [a, b]
    engine.step()  # both admitted: the queue has room again
    c = engine.submit(_seq(llama, "prefix", PROMPTS[0]))
    _drain(engine)
    assert a.output_ids == llama.reference("prompt", llama.ids(PROMPTS[0]))
    assert b.output_ids == llama.reference(None, llama.ids(PROMPTS[1]))
    assert c.output_ids == llama.reference("prefix", llama.ids(PROMPTS[0]))
    assert len(engine.runner.seqs) == 0


def test_max_batch_size_and_fcfs(llama):
    engine = llama.engine(max_batch_size=2)
    variants = [None, "prompt", "prefix", "ptuning-mlp", "prefix-proj", "ptuning-lstm"]
    seqs = [engine.submit(_seq(llama, v, PROMPTS[i % 2], max_new_tokens=3 + i)) for i, v in enumerate(variants)]
    admitted_at: dict[int, int] = {}

    def check(step):
        assert len(engine.runner.seqs) <= 2 and engine.num_running <= 2
        for i, s in enumerate(seqs):
            if s.output_ids and i not in admitted_at:
                admitted_at[i] = step

    _drain(engine, on_step=check)
    order = sorted(range(len(seqs)), key=lambda i: (admitted_at[i], i))
    assert order == list(range(len(seqs)))
    assert [admitted_at[i] for i in order] == sorted(admitted_at.values())
    assert len(set(admitted_at.values())) > 2, "requests were not held back by the batch limit"
    for i, (s, v) in enumerate(zip(seqs, variants)):
        ids = llama.ids(PROMPTS[i % 2])
        assert s.output_ids == llama.reference(v, ids)[: 3 + i], v
    assert len(engine.runner.seqs) == 0


def test_prefill_budget_counts_prompt_tokens(llama):
    """Four requests of 5 virtual + 2 prompt tokens each; a budget of 5 prompt tokens a step admits
    two and a half: the third's prompt is split over two steps. Virtual tokens are copied, not computed."""
    engine = llama.engine(max_prefill_tokens=5)
    seqs = [engine.submit(_seq(llama, "prompt", PROMPTS[0], max_new_tokens=5)) for _ in range(4)]
    assert [s.pending for s in seqs] == [2] * 4
    engine.step()
    assert engine.num_running == 3 and engine.num_waiting == 1
    assert engine.stats["prefill_tokens"] == 5
    assert [len(s.output_ids) for s in seqs] == [1, 1, 0, 0] and seqs[2].computed == 1
    engine.step()
    assert engine.num_running == 4 and engine.num_waiting == 0
    assert [len(s.output_ids) for s in seqs] == [2, 2, 1, 1]
    _drain(engine)
    for s in seqs:
        assert s.output_ids == llama.reference("prompt", llama.ids(PROMPTS[0]))[:5]


def test_long_prompts_are_prefilled_in_chunks_alongside_decoding(llama):
    """A budget of 4 prompt tokens a step: long prompts take several steps each, while the requests
    already running decode one token every step; every request's tokens equal it run alone."""
    engine = llama.engine(max_prefill_tokens=4)
    first = engine.submit(_seq(llama, None, PROMPTS[0], max_new_tokens=12))  # 2 tokens
    engine.step()
    late = [engine.submit(_seq(llama, v, PROMPTS[1], max_new_tokens=5)) for v in ("ptuning-mlp", "prompt", None)]
    assert len(late[0].prompt_ids) > 8
    steps = 0
    while not all(s.output_ids for s in late):
        before = len(first.output_ids)
        engine.step()
        steps += 1
        assert len(first.output_ids) == min(before + 1, 12), "a running request missed a step during a prefill"
        assert engine.stats["prefill_tokens"] <= 2 + 4 * steps
        assert steps < 200 and not any(s.finished and not s.output_ids for s in late), "the prefill does not finish"
    assert steps >= 3 * len(late[0].prompt_ids) // 4
    _drain(engine)
    alone = llama.engine()
    for seq in [first] + late:
        want = alone.generate(seq.prompt_ids, seq.params, seq.adapter).output_ids
        assert seq.output_ids == want


# --- finish reasons -------------------------------------------------------------------------------


def test_finish_reason_length(llama):
    engine = llama.engine()
    seq = engine.generate(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=3), llama.adapter("prefix"))
    assert seq.finish_reason == FinishReason.LENGTH
    assert len(seq.output_ids) == len(seq.logprobs) == 3


def test_finish_reason_eos(llama):
    assert llama.engine().eos_ids == {llama.tokenizer.eos_token_id}
    ids = llama.ids(PROMPTS[1])
    free = llama.engine().generate(ids, SamplingParams(max_new_tokens=MAX_NEW), llama.adapter("ptuning-mlp"))
    assert free.finish_reason == FinishReason.LENGTH
    eos = free.output_ids[3]
    cut = free.output_ids.index(eos) + 1  # the first time the model produces it
    engine = llama.engine()
    engine.eos_ids = {eos}  # pretend that token is the model's end of sequence
    seq = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW), llama.adapter("ptuning-mlp"))
    assert seq.finish_reason == FinishReason.EOS
    assert seq.output_ids == free.output_ids[:cut]
    seq = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), llama.adapter("ptuning-mlp"))
    assert seq.finish_reason == FinishReason.LENGTH
    assert seq.output_ids == free.output_ids
    _drain(engine)
    assert len(engine.runner.seqs) == 0


def _ascii_stop(tok, output_ids):
    """The first generated token that decodes to one printable ASCII character (one byte = one token)."""
    for k, t in enumerate(output_ids):
        text = tok.decode([t])
        if len(text) == 1 and text.isascii() and text.isprintable():
            return k, text
    return None


def test_finish_reason_stop_string(llama):
    tok = llama.tokenizer
    for variant in (None, "prompt", "prefix", "ptuning-mlp", "ptuning-lstm", "prefix-proj"):
        ids = llama.ids(PROMPTS[1])
        free = llama.engine().generate(ids, SamplingParams(max_new_tokens=MAX_NEW), llama.adapter(variant))
        found = _ascii_stop(tok, free.output_ids)
        if found and found[0] >= 1:
            break
    else:
        pytest.fail("no ASCII character among the generated tokens to use as a stop string")
    k, stop = found
    engine = llama.engine()
    seq = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW, stop=("never-appears", stop)),
                          llama.adapter(variant))
    assert seq.finish_reason == FinishReason.STOP
    assert seq.output_ids == free.output_ids[: k + 1]
    assert seq.text.endswith(stop)
    # a stop string spanning two tokens
    two = tok.decode(free.output_ids[k:k + 2])
    if len(two) == 2 and two.isascii() and two.isprintable():
        seq = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW, stop=(two,)), llama.adapter(variant))
        assert seq.finish_reason == FinishReason.STOP and seq.text.endswith(two)
        assert seq.output_ids == free.output_ids[: k + 2]
    _drain(engine)
    assert len(engine.runner.seqs) == 0


def test_rows_freed_after_everything_finishes(llama):
    engine = llama.engine()
    for v in (None, "prompt", "prefix", "ptuning-lstm"):
        for p in PROMPTS:
            engine.submit(_seq(llama, v, p, max_new_tokens=3))
    _drain(engine)
    assert engine.runner.seqs == [] and engine.runner.pool.held == 0, "an idle engine still holds key/value slots"
    assert engine.runner.pool.free == [[0, engine.runner.pool.slots]]
    assert not engine.has_work()


def check_memory(engine) -> int:
    """Every running request holds one segment of at most prompt + generated slots (plus the growth
    chunk not yet written), and a share of its adapter's prefix segment: one per adapter version in
    use, counted by exactly the requests holding it, none idle; segments do not overlap; the pool's
    bytes never change. Returns the slots held."""
    from collections import Counter

    from server.engine.kv_cache import GROWTH_SLOTS

    pool = engine.runner.pool
    seqs = engine.runner.seqs
    siblings = [m for s in seqs for m in s.siblings]  # n / best_of: empty segments until forked
    assert all(m.segment is not None and m.segment.length == 0 for m in siblings)
    holders = Counter(s.shared_prefix for s in seqs + siblings if s.shared_prefix is not None)
    shared = [p.segment for p in holders]
    scratch = [engine.runner.graphs.scratch] if engine.runner.graphs is not None else []  # CUDA graphs' padding
    segments = sorted([s.segment for s in seqs + siblings] + shared + scratch, key=lambda seg: seg.start)
    for a, b in zip(segments, segments[1:]):
        assert a.start + a.capacity <= b.start, "two segments share key/value slots"
    assert not segments or segments[-1].start + segments[-1].capacity <= pool.slots
    for s in seqs:
        seg = s.segment
        assert (s.shared_prefix is None) == (s.adapter is None)
        if s.shared_prefix is not None:
            assert s.shared_prefix.key == s.adapter.prefix_key and pool.prefixes[s.shared_prefix.key] is s.shared_prefix
            assert s.shared_prefix.segment.length == s.shared_prefix.segment.capacity == s.prefix_length
        assert s.computed <= len(s.prompt_ids) + max(len(s.output_ids) - 1, 0) or s.preemptions
        assert seg.capacity <= len(s.prompt_ids) + len(s.output_ids) + GROWTH_SLOTS
    assert {p: p.refs for p in pool.prefixes.values()} == dict(holders), "a shared prefix miscounted or idle"
    held = sum(seg.capacity for seg in segments)
    assert pool.held == held and set(pool.segments) == set(segments)
    assert pool.written == sum(seg.length for seg in segments)
    return held


def test_steady_load_memory_stays_bounded(llama):
    """Under continuous traffic the engine never empties: each request holds only its own slots,
    so what is held stays bounded by what the running requests need, however many steps are served."""
    variants = [None, "prompt", "prefix", "ptuning-mlp", "prefix-proj", "ptuning-lstm"]
    ids = llama.ids(PROMPTS[0])
    alone_engine = llama.engine()
    alone = {v: alone_engine.generate(ids, SamplingParams(max_new_tokens=6), llama.adapter(v)).output_ids
             for v in variants}
    engine = llama.engine()
    seqs, most_held = [], 0
    for step in range(150):
        if step % 3 == 0:
            v = variants[(step // 3) % len(variants)]
            seqs.append((engine.submit(_seq(llama, v, PROMPTS[0], max_new_tokens=6)), v))
        engine.step()
        assert len(engine.runner.seqs) > 0
        most_held = max(most_held, check_memory(engine))
    _drain(engine)
    for seq, v in seqs:
        assert seq.output_ids == alone[v], v
    assert most_held <= 3 * (5 + len(ids) + 6), "requests hold more slots than they need"
    assert engine.runner.pool.held == 0


def test_aborted_waiting_request_leaves_no_state(llama):
    """A request aborted while still queued (a client that gives up under load) must not leave its
    per-request state behind once the engine has dropped it: the engine keeps an incremental
    detokenizer per request (held by the request itself, so it goes with it)."""
    engine = llama.engine(max_batch_size=1)
    running = engine.submit(_seq(llama, None, PROMPTS[0], max_new_tokens=3))
    queued = [engine.submit(_seq(llama, None, PROMPTS[0], max_new_tokens=3)) for _ in range(3)]
    engine.step()
    for seq in queued:
        engine.abort(seq)
    _drain(engine)
    assert running.finished and all(not s.output_ids for s in queued)
    assert len(engine.runner.seqs) == 0
    assert not engine.has_work() and engine.runner.pool.held == 0


def test_failed_step_fails_its_requests_and_leaves_a_clean_engine(llama, monkeypatch):
    """A forward that raises (say, out of memory) fails the requests of that step with the error,
    frees everything, and the next request is served as if nothing had happened."""
    engine = llama.engine()
    errors = []

    def submit(variant, prompt):
        seq = _seq(llama, variant, prompt)
        seq.on_token = lambda _, event: errors.append(event)
        return engine.submit(seq)

    seqs = [submit(v, PROMPTS[1]) for v in ("prompt", None)]
    engine.step()
    late = submit("prefix", PROMPTS[0])

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine.runner, "_forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    monkeypatch.undo()
    assert all(s.aborted for s in seqs + [late])
    assert sum(isinstance(e, RuntimeError) and "out of memory" in str(e) for e in errors) == 3
    assert not engine.has_work() and engine.runner.seqs == [] and engine.runner.pool.held == 0
    ids = llama.ids(PROMPTS[1])
    again = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW), llama.adapter("prompt"))
    assert again.output_ids == llama.engine().generate(ids, SamplingParams(max_new_tokens=MAX_NEW),
                                                       llama.adapter("prompt")).output_ids


def test_empty_prompt_is_refused():
    with pytest.raises(InvalidRequest, match="no tokens"):
        Sequence([], SamplingParams())
