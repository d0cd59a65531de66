"""One copy of each adapter's prefix in the KV pool: the shared segments' reference counts, the
scheduler's accounting (a prefix charged once), and the engine's tokens with many requests on one
adapter, through every fast path, chunked prefill, preemption, compaction, failed steps and an
adapter replaced while its requests run."""

from __future__ import annotations

import dataclasses

import torch

from server.engine.kv_cache import GROWTH_SLOTS, KVPool, Ledger, first_capacity, own_most_slots
from server.engine.request import SamplingParams, Sequence
from tests.conftest import MAX_NEW, PROMPTS
from tests.unit.test_engine import _drain, check_memory

VARIANTS = ["prompt", "prefix", "ptuning-mlp", "prefix-proj", "ptuning-lstm"]


def _pool(slots: int = 256) -> KVPool:
    return KVPool(2, 2, 4, "cpu", torch.float32, slots=slots)


def _prefix(n: int, value: float) -> torch.Tensor:
    return torch.full((2, 2, 2, n, 4), value)  # [layers, 2, kv_heads, n, head_dim]


# --- the pool -------------------------------------------------------------------------------------


def test_a_prefix_is_written_once_and_freed_by_its_last_holder():
    pool = _pool()
    a = pool.acquire_prefix(("a", "v1", None, 8), _prefix(8, 1.0))
    again = pool.acquire_prefix(("a", "v1", None, 8), _prefix(8, 9.0))  # resident: not written again
    assert again is a and a.refs == 2 and (pool.held, pool.written) == (8, 8)
    assert (pool.kv[:, :, :, a.segment.start:a.segment.end] == 1.0).all()
    b = pool.acquire_prefix(("a", "v2", None, 8), _prefix(8, 2.0))  # another version: its own copy
    assert b is not a and (pool.held, pool.written) == (16, 16) and len(pool.prefixes) == 2
    pool.release_prefix(a)
    assert pool.held == 16 and a.refs == 1
    pool.release_prefix(a)
    assert pool.held == 8 and pool.written == 8 and list(pool.prefixes) == [("a", "v2", None, 8)]
    pool.release_prefix(b)
    assert (pool.held, pool.written, pool.prefixes, pool.free) == (0, 0, {}, [[0, 256]])


def test_compaction_moves_shared_prefixes_with_their_keys():
    pool = _pool(64)
    first = pool.allocate(10)
    shared = pool.acquire_prefix(("a", "v1", None, 12), _prefix(12, 3.0))
    own = pool.allocate(20)
    own.length = 20
    pool.kv[:, :, :, own.start:own.end] = 5.0
    pool.release(first)  # a hole of 10 before the prefix, 22 free after `own`
    pool.extend(own, 48)  # 28 more: no hole holds them, so the segments are compacted
    assert pool.compactions == 1 and shared.segment.start == 0 and own.start == 12
    assert (pool.kv[:, :, :, 0:12] == 3.0).all() and (pool.kv[:, :, :, 12:32] == 5.0).all()
    assert pool.held == 60 and pool.written == 32


def test_clear_drops_the_shared_prefixes():
    pool = _pool()
    pool.acquire_prefix(("a", "v1", None, 8), _prefix(8, 1.0))
    pool.allocate(30)
    pool.clear()
    assert (pool.held, pool.written, pool.prefixes, pool.free) == (0, 0, {}, [[0, 256]])


# --- the scheduler's accounting -------------------------------------------------------------------


@dataclasses.dataclass
class _Adapter:
    prefix_key: tuple
    prefix_length: int


def _seq(adapter: _Adapter | None, prompt: int = 5, max_new: int = 10) -> Sequence:
    return Sequence(list(range(1, prompt + 1)), SamplingParams(max_new_tokens=max_new), adapter)


def test_the_ledger_charges_a_prefix_once_and_returns_it_with_its_last_holder():
    a, b = _Adapter(("a", "1", None, 100), 100), _Adapter(("b", "1", None, 40), 40)
    one, two, other, plain = _seq(a), _seq(a), _seq(b), _seq(None)
    ledger = Ledger(1000, [])
    own = first_capacity(one)
    assert own == 5 + 10 and own_most_slots(one) == 15
    assert ledger.admission(one) == own + 100
    ledger.admit(one)
    assert ledger.free == 1000 - own - 100
    assert ledger.admission(two) == own  # resident: its own slots only
    ledger.admit(two)
    ledger.admit(other)
    ledger.admit(plain)
    assert ledger.free == 1000 - 4 * own - 140
    for seq in (one, two, other, plain):  # as the runner holds them
        seq.segment = dataclasses.make_dataclass("Seg", ["capacity"])(own)
    assert Ledger(1000, [one, two, other, plain]).free == ledger.free
    ledger.drop(two)
    assert ledger.free == 1000 - 3 * own - 140  # `one` still reads the prefix
    ledger.drop(one)
    assert ledger.free == 1000 - 2 * own - 40
    ledger.drop(other)
    ledger.drop(plain)
    assert ledger.free == 1000 and not ledger.holders


# --- the engine -----------------------------------------------------------------------------------


def _many(w, per_adapter: int = 3, max_new: int = MAX_NEW, **params) -> list[Sequence]:
    """`per_adapter` requests on each adapter kind (both prompts), and as many without an adapter."""
    return [Sequence(w.ids(PROMPTS[i % 2]), SamplingParams(max_new_tokens=max_new, **params), w.adapter(v))
            for v in VARIANTS + [None] for i in range(per_adapter)]


def _prefix_slots(seqs) -> int:
    return sum({s.adapter.prefix_key: s.prefix_length for s in seqs if s.adapter}.values())


def _check_tokens(w, seqs, paths=None) -> None:
    """Each request's tokens equal it run alone (its own prefix, nothing shared) and PEFT's."""
    alone = w.engine(**({"paths": paths} if paths else {}))
    for s in seqs:
        variant = next((v for v in VARIANTS if s.adapter is not None and s.adapter.name == v), None)
        want = alone.generate(s.prompt_ids, s.params, s.adapter).output_ids
        assert s.output_ids == want, (variant, s.preemptions)
        assert s.output_ids == w.reference(variant, s.prompt_ids)[:len(s.output_ids)], variant


def test_requests_on_one_adapter_share_its_prefix_and_keep_their_tokens(llama, paths):
    """Three requests on each adapter kind and three without, in one batch, through every fast path:
    one prefix per adapter in the pool, each request's tokens as alone and as PEFT's."""
    engine = llama.engine(max_batch_size=32, paths=paths)
    seqs = _many(llama)
    for s in seqs:
        engine.submit(s)
    shared = []

    def check(_):
        check_memory(engine)
        shared.append(len(engine.runner.pool.prefixes))

    _drain(engine, on_step=check)
    assert shared[0] == len(VARIANTS), "the adapters' prefixes were not each held once"
    assert engine.runner.pool.held == 0 and engine.runner.pool.prefixes == {}
    _check_tokens(llama, seqs, paths)


def test_chunked_prefill_reads_the_shared_prefix(llama):
    """A prefill budget of 3 tokens a step: prompts on a shared prefix computed over several steps,
    beside requests decoding on the same prefix."""
    engine = llama.engine(max_prefill_tokens=3)
    seqs = _many(llama, per_adapter=2)
    for s in seqs:
        engine.submit(s)
    _drain(engine, max_steps=2000, on_step=lambda _: check_memory(engine))
    _check_tokens(llama, seqs)


def _slot_bytes(w) -> int:
    spec = w.spec
    return KVPool.slot_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)


def test_a_budget_that_fits_one_prefix_runs_its_requests_together(llama):
    """A pool of one prefix and four requests' own slots: the four requests on that adapter run side
    by side (with a copy each, only one or two would fit), and the same tokens come out."""
    short = llama.adapter("prefix")  # 6 virtual tokens: repeated to 120, a prefix longer than the requests
    adapter = dataclasses.replace(short, kv=short.kv.repeat(1, 1, 1, 20, 1), num_virtual_tokens=120, version="long")
    seqs = [Sequence(llama.ids(PROMPTS[1]), SamplingParams(max_new_tokens=MAX_NEW), adapter) for _ in range(4)]
    slots = adapter.prefix_length + 4 * first_capacity(seqs[0])
    assert 2 * (adapter.prefix_length + first_capacity(seqs[0])) > slots
    engine = llama.engine(kv_cache_bytes=slots * _slot_bytes(llama))
    for s in seqs:
        engine.submit(s)
    engine.step()
    assert engine.num_running == 4 and len(engine.runner.pool.prefixes) == 1
    _drain(engine, on_step=lambda _: check_memory(engine))
    assert engine.scheduler.preemptions == 0
    alone = llama.engine().generate(seqs[0].prompt_ids, seqs[0].params, adapter).output_ids
    assert all(s.output_ids == alone for s in seqs)


def test_preemption_and_compaction_under_a_tight_budget_keep_the_accounting_exact(llama):
    """Eighteen requests over five adapters and none, long enough to grow, in a pool of room for a
    few: requests on a shared prefix preempted while others keep reading it, segments compacted
    around the shared ones; the holders' counts exact at every step, nothing held at the end, and
    every request's tokens as alone."""
    long = GROWTH_SLOTS + 8
    seqs = _many(llama, per_adapter=3, max_new=long, ignore_eos=True)
    most = max(first_capacity(s) + long for s in seqs) + _prefix_slots(seqs) // 2
    engine = llama.engine(kv_cache_bytes=3 * most * _slot_bytes(llama))
    for s in seqs:
        engine.submit(s)
    preempted_beside_a_holder = []

    def check(_):
        check_memory(engine)
        running = {s.adapter.prefix_key for s in engine.scheduler.running if s.adapter}
        preempted_beside_a_holder.extend(s for s in engine.scheduler.waiting
                                         if s.preemptions and s.adapter and s.adapter.prefix_key in running)

    _drain(engine, max_steps=5000, on_step=check)
    assert engine.scheduler.preemptions > 0 and preempted_beside_a_holder, "the test proves nothing"
    assert engine.runner.pool.compactions > 0, "nothing was compacted: the test proves less than it says"
    assert (engine.runner.pool.held, engine.runner.pool.written, engine.runner.pool.prefixes) == (0, 0, {})
    alone = llama.engine()
    for s in seqs:
        assert s.output_ids == alone.generate(s.prompt_ids, s.params, s.adapter).output_ids, s.preemptions


def test_a_failed_step_with_newcomers_on_a_shared_prefix_leaves_the_holders_right(llama, monkeypatch):
    """A step whose newcomers share the running requests' prefix fails once: it runs again without
    them, the running requests keep the prefix (its count back to theirs), the rest finish as alone."""
    from server.engine import model_runner

    engine = llama.engine()
    first = [engine.submit(s) for s in _many(llama, per_adapter=1)]
    engine.step()
    original, failed = model_runner.ModelRunner._forward, []

    def fail_once(self, batch, tokens, sampling):
        if not failed and any(s.computed == 0 for s in batch):
            failed.append(True)
            raise RuntimeError("injected")
        return original(self, batch, tokens, sampling)

    monkeypatch.setattr(model_runner.ModelRunner, "_forward", fail_once)
    late = [engine.submit(s) for s in _many(llama, per_adapter=1)]
    engine.step()
    assert failed and all(s.aborted for s in late)
    check_memory(engine)
    _drain(engine, on_step=lambda _: check_memory(engine))
    assert (engine.runner.pool.held, engine.runner.pool.prefixes) == (0, {})
    _check_tokens(llama, first)


def test_a_replaced_adapter_serves_its_running_requests_the_version_they_started_with(llama):
    """Requests on an adapter's first version keep reading that version's prefix while requests on
    its replacement (same name, other files) read theirs: two prefixes of one name side by side, each
    request's tokens those of its version alone. One version's prefix is shared whatever object holds
    it; in-memory adapters (no version) never share."""
    old = llama.adapter("prompt")
    other = llama.adapter("ptuning-mlp")
    new = dataclasses.replace(old, kv=other.kv, num_virtual_tokens=other.num_virtual_tokens, version="replaced")
    engine = llama.engine()
    running = [engine.submit(Sequence(llama.ids(PROMPTS[i % 2]), SamplingParams(max_new_tokens=MAX_NEW), old))
               for i in range(2)]
    engine.step()
    engine.step()
    later = [engine.submit(Sequence(llama.ids(PROMPTS[i % 2]), SamplingParams(max_new_tokens=MAX_NEW), new))
             for i in range(2)]
    same = engine.submit(Sequence(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=3),
                                  dataclasses.replace(old)))  # another object of the first version
    engine.step()
    prefixes = engine.runner.pool.prefixes
    assert len(prefixes) == 2 and {k[0] for k in prefixes} == {"prompt"}
    assert prefixes[old.prefix_key].refs == 3 and same.shared_prefix is running[0].shared_prefix
    _drain(engine, on_step=lambda _: check_memory(engine))
    alone = llama.engine()
    for s in running + later + [same]:
        assert s.output_ids == alone.generate(s.prompt_ids, s.params, s.adapter).output_ids
    assert running[0].output_ids != later[0].output_ids  # two versions, two answers
    assert running[0].output_ids == llama.reference("prompt", running[0].prompt_ids)

    unversioned = [dataclasses.replace(old, version="") for _ in range(2)]
    assert unversioned[0].prefix_key != unversioned[1].prefix_key


def test_registry_replace_and_delete_while_requests_run(llama, store_registry):
    """Through the registry: an adapter replaced (other files) while two requests run on it, then
    deleted while its replacement's requests run; each request keeps the version it started with,
    one prefix segment per version while used, none left; re-adding the first files shares again."""
    registry, _ = store_registry
    registry.add("tenant", *llama.files("prompt"))
    engine = llama.engine()
    params = SamplingParams(max_new_tokens=MAX_NEW)
    first = [engine.submit(Sequence(llama.ids(PROMPTS[i]), params, registry.get("tenant"))) for i in range(2)]
    engine.step()
    registry.replace("tenant", *llama.files("prefix"))
    second = [engine.submit(Sequence(llama.ids(PROMPTS[i]), params, registry.get("tenant"))) for i in range(2)]
    engine.step()
    keys = set(engine.runner.pool.prefixes)
    assert len(keys) == 2 and {k[0] for k in keys} == {"tenant"}
    assert {s.adapter.version for s in first} != {s.adapter.version for s in second}
    registry.remove("tenant")
    _drain(engine, on_step=lambda _: check_memory(engine))
    assert (engine.runner.pool.held, engine.runner.pool.prefixes) == (0, {})
    for s, variant in [(s, "prompt") for s in first] + [(s, "prefix") for s in second]:
        assert s.output_ids == llama.reference(variant, s.prompt_ids), variant
    again = registry.add("tenant", *llama.files("prompt"))
    assert again.prefix_key == first[0].adapter.prefix_key  # the same files: the same prefix, shared
