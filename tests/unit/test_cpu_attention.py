"""The CPU attention kernel against the per-request SDPA path it replaces, and its fallback."""

from __future__ import annotations

import functools
import logging
import random

import pytest
import torch
import torch.nn.functional as F

from server.engine import attention
from server.engine.cpu import attention as cpu_attention, kernels as cpu_kernels
from server.engine.kv_cache import KVPool
from tests.conftest import each_isa

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DECODE_LENS = [1, 300, 57, 2, 129, 16, 17, 64]  # keys per decoding request: 1, long, around a window of 16


PREFIX_LENS = [0, 40, 5, 0, 40, 2, 16, 40]  # per DECODE_LENS request: one prefix of 40 shared by three, none, short
MIXED_Q_LENS = [1, 1, 20, 2, 1, 14, 1, 24]  # per DECODE_LENS request: prefilling ones among decoding ones, one
# whole own segment (after its prefix) at once


def _step(heads, kv_heads, head_dim, dtype, q_lens, kv_lens, seed=0, prefix_lens=None):
    """A one-layer pool of random keys/values (gaps included) whose segments lie out of packing order with
    unwritten slots between them; returns the step and its queries [tokens, heads, head_dim].
    prefix_lens: per request, the part of its kv_len read from a shared prefix segment (requests with
    one length share one), allocated between the requests' own segments."""
    torch.manual_seed(seed)
    prefix_lens = prefix_lens or [0] * len(kv_lens)
    pool = KVPool(1, kv_heads, head_dim, "cpu", dtype, slots=sum(kv_lens) + 8 * len(kv_lens) + 16)
    segs, prefixes = [], {}
    for kv, p in zip(kv_lens, prefix_lens):
        segs.append(pool.allocate(kv - p + 8))
        if p and p not in prefixes:
            prefixes[p] = pool.allocate(p).start
    pool.kv.normal_()
    order = list(range(len(kv_lens)))
    random.Random(seed).shuffle(order)
    step = attention.RaggedStep.build(pool, [segs[i].start for i in order], [q_lens[i] for i in order],
                                      [kv_lens[i] for i in order], True,
                                      [prefixes.get(prefix_lens[i], 0) for i in order],
                                      [prefix_lens[i] for i in order])
    query = torch.randn(sum(q_lens), heads, head_dim).to(dtype)
    return step, query


def _joined(step, query, i) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Request i's query [n, heads, head_dim] and its keys and values [kv_heads, kv_len, head_dim] copied
    out of the pool by hand: the prefix range, then the own segment's."""
    kv, p, own = step.pool.kv[0], step.prefix_lens[i], step.kv_lens[i] - step.prefix_lens[i]
    ps, s = step.prefix_starts[i], step.starts[i]
    k = torch.cat([kv[0, :, ps:ps + p], kv[0, :, s:s + own]], dim=1)
    v = torch.cat([kv[1, :, ps:ps + p], kv[1, :, s:s + own]], dim=1)
    first = sum(step.q_lens[:i])
    return query[first:first + step.q_lens[i]], k, v


def _sdpa(step, query, scale, window) -> torch.Tensor:
    """The per-request SDPA loop: [tokens, heads, head_dim]."""
    return torch.cat(attention._sdpa_each(step, query, step.pool.kv[0], scale, window, range(len(step.q_lens))))


@pytest.fixture(params=cpu_attention.ISAS)
def isa(request, cpu_kernels_built):
    """The kernel held to one of its instruction sets, or a skip where this CPU lacks it."""
    yield from each_isa(cpu_attention.isa, request)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 4), (8, 8), (8, 1), (12, 4), (16, 2)],
                         ids=["gqa", "mha", "mqa", "group-3", "group-8"])
@pytest.mark.parametrize("head_dim", [64, 128, 48, 40, 17])
@pytest.mark.parametrize("q_lens, prefixes, window", [
    ([1] * len(DECODE_LENS), None, None),
    ([1] * len(DECODE_LENS), PREFIX_LENS, 16),
    (MIXED_Q_LENS, PREFIX_LENS, None),
    (MIXED_Q_LENS, None, 16),
], ids=["decoding", "decoding-prefixed-window", "mixed-prefixed", "mixed-window"])
def test_step_matches_sdpa(isa, dtype, heads, kv_heads, head_dim, q_lens, prefixes, window):
    step, query = _step(heads, kv_heads, head_dim, dtype, q_lens, DECODE_LENS,
                        prefix_lens=prefixes and [min(p, kv - 1) for p, kv in zip(prefixes, DECODE_LENS)])
    scale = 0.3
    out = attention._per_request(step, query, step.pool.kv[0], scale, window)
    assert out.dtype == dtype and out.shape == (sum(q_lens), heads, head_dim)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, _sdpa(step, query, scale, window), atol=tol, rtol=tol)


def test_attention_does_not_depend_on_how_the_work_is_shared(cpu_kernels_built):
    """(request, KV head, rows) tasks go to whichever thread asks first: bit-identical with 1, 2 and 7 threads."""
    step, query = _step(8, 4, 64, torch.float32, MIXED_Q_LENS, DECODE_LENS)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            outs.append(attention._per_request(step, query, step.pool.kv[0], 0.3, None))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], out) for out in outs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 4), (8, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("per_call", [None, 3], ids=["one-call", "groups-of-3"])
@pytest.mark.parametrize("prefixes", [None, PREFIX_LENS], ids=["own", "prefixed"])
def test_padded_decode_matches_sdpa(monkeypatch, dtype, heads, kv_heads, window, per_call, prefixes):
    """The accelerators' decode (a padded gather, one SDPA call per group of requests) on CPU tensors."""
    if per_call:
        monkeypatch.setattr(attention, "PADDED_DECODE_ELEMENTS", per_call * max(DECODE_LENS) * kv_heads * 40)
    step, query = _step(heads, kv_heads, 40, dtype, [1] * len(DECODE_LENS), DECODE_LENS,
                        prefix_lens=prefixes and [min(p, kv - 1) for p, kv in zip(prefixes, DECODE_LENS)])
    decoding = attention.decoding(step)
    out = attention._padded_decode(decoding.max_kv, query, step.pool.kv[0], decoding.starts, decoding.kv_lens,
                                   decoding.prefix_starts, decoding.prefix_lens, 0.3, window)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, _sdpa(step, query, 0.3, window), atol=tol, rtol=tol)


class _Layer(torch.nn.Module):
    layer_idx = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("q_lens, kv_lens", [
    ([1, 5, 1, 1, 9, 1, 3], [40, 5, 1, 300, 20, 7, 3]),  # decoding and prefilling requests mixed
    ([4, 7], [10, 7]),  # prefilling only
    ([1], [33]),  # one decoding request
], ids=["mixed", "prefill", "one"])
def test_mixed_step_end_to_end(cpu_kernels_built, monkeypatch, dtype, window, q_lens, kv_lens):
    """ragged_attention with the kernel equals it without: outputs in packing order, keys written."""
    heads, kv_heads, head_dim = 8, 4, 64
    step, query = _step(heads, kv_heads, head_dim, dtype, q_lens, kv_lens, seed=1)
    tokens = sum(q_lens)
    key, value = (torch.randn(1, kv_heads, tokens, head_dim).to(dtype) for _ in range(2))

    def run():
        out, _ = attention.ragged_attention(_Layer(), query.transpose(0, 1)[None], key, value, attention.NO_MASK,
                                            scaling=0.125, ragged=step, sliding_window=window)
        return out

    fast = run()
    monkeypatch.setattr(cpu_attention, "supports", lambda query, kv: False)
    slow = run()
    assert fast.shape == (1, tokens, heads, head_dim)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)


def test_default_scale_and_bounds(cpu_kernels_built):
    step, query = _step(4, 2, 32, torch.float32, [1, 1], [9, 30])
    torch.testing.assert_close(attention._per_request(step, query, step.pool.kv[0], None, None),
                               _sdpa(step, query, None, None), atol=1e-5, rtol=1e-5)
    q = query
    slots = step.pool.slots
    ones = torch.tensor([1, 1])
    with pytest.raises(RuntimeError, match="not in the pool"):
        cpu_attention.attend(q, step.pool.kv[0], ones, torch.tensor([0, slots - 5]), torch.tensor([9, 30]),
                             torch.tensor([0, 0]), torch.tensor([0, 0]), None, None)
    with pytest.raises(RuntimeError, match="prefix keys .* are not in the pool"):
        cpu_attention.attend(q, step.pool.kv[0], ones, torch.tensor([0, 0]), torch.tensor([9, 30]),
                             torch.tensor([0, slots - 2]), torch.tensor([0, 4]), None, None)
    with pytest.raises(RuntimeError, match="3 query rows for 2 keys of its own"):
        cpu_attention.attend(q, step.pool.kv[0], torch.tensor([1, 3]), torch.tensor([0, 0]), torch.tensor([9, 6]),
                             torch.tensor([0, 0]), torch.tensor([0, 4]), None, None)
    with pytest.raises(RuntimeError, match="q_lens add up to 3 rows, query has 2"):
        cpu_attention.attend(q, step.pool.kv[0], torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([9, 30]),
                             torch.tensor([0, 0]), torch.tensor([0, 0]), None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("prefix", [0, 21])
def test_rows_do_not_depend_on_chunking_or_neighbours(isa, dtype, window, prefix):
    """A prompt's rows, bit for bit: all in one step, cut into chunks (a chunk's keys being the ones
    before it and its own), beside other requests, and its last row as a decoding step."""
    heads, kv_heads, dim, n = 8, 4, 64, 45
    step, query = _step(heads, kv_heads, dim, dtype, [n], [prefix + n], seed=3, prefix_lens=[prefix])
    kv = step.pool.kv[0]
    longs = functools.partial(torch.tensor, dtype=torch.long)
    start, pre_start = step.starts[0], step.prefix_starts[0]

    def rows(first, count, before=()):  # rows [first, first + count) of the prompt, after `before` requests
        q = torch.cat([query[:b] for b in before] + [query[first:first + count]])
        q_lens = [*before, count]
        out = cpu_attention.attend(q.contiguous(), kv, longs(q_lens), longs([start] * len(q_lens)),
                                   longs([prefix + b for b in before] + [prefix + first + count]),
                                   longs([pre_start] * len(q_lens)), longs([prefix] * len(q_lens)), 0.2, window)
        return out[sum(before):]

    whole = rows(0, n)
    assert torch.equal(torch.cat([rows(0, 17), rows(17, 1), rows(18, 27)]), whole)
    assert torch.equal(rows(30, 15, before=(3, 12, 1)), whole[30:])
    assert torch.equal(rows(n - 1, 1), whole[-1:])


def test_unavailable_kernel_falls_back_with_one_warning(monkeypatch, caplog):
    def fail():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_ops", None)
    monkeypatch.setattr(cpu_kernels, "_load", fail)
    step, query = _step(8, 4, 64, torch.float32, [1, 3, 1], [50, 3, 120])
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        first = attention._per_request(step, query, step.pool.kv[0], 0.125, None)
        again = attention._per_request(step, query, step.pool.kv[0], 0.125, None)
    assert not cpu_kernels.available() and not cpu_attention.supports(query, step.pool.kv[0])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    torch.testing.assert_close(first, _sdpa(step, query, 0.125, None), atol=0, rtol=0)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_other_dtypes_and_devices_are_not_taken():
    kv = torch.zeros(2, 4, 8, 16)
    assert not cpu_attention.supports(torch.zeros(1, 8, 16, dtype=torch.float16), kv.half())
    assert not cpu_attention.supports(torch.zeros(1, 8, 16), kv.bfloat16())
    assert not cpu_attention.supports(torch.zeros(1, 8, 16, device="meta"), kv.to("meta"))


def _copied(step, query) -> attention.RaggedStep:
    """The step as the pool held it before prefixes were shared: each request's prefix copied into
    the start of its own segment (a pool of its own, segments in packing order)."""
    pool = KVPool(1, step.pool.kv.shape[2], step.pool.kv.shape[4], "cpu", step.pool.dtype,
                  slots=sum(step.kv_lens) + 4 * len(step.kv_lens))
    starts = []
    for i, kv_len in enumerate(step.kv_lens):
        seg = pool.allocate(kv_len + 4)
        _, k, v = _joined(step, query, i)
        pool.kv[0, 0, :, seg.start:seg.start + kv_len] = k
        pool.kv[0, 1, :, seg.start:seg.start + kv_len] = v
        starts.append(seg.start)
    return attention.RaggedStep.build(pool, starts, step.q_lens, step.kv_lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "sdpa"])
def test_a_shared_prefix_reads_as_a_copied_one(cpu_kernels_built, monkeypatch, dtype, window, kernel):
    """Decoding and prefilling requests, some on one shared prefix, some on their own, some with none:
    the same outputs, bit for bit, as with each prefix copied before the request's own keys (the
    layout before prefixes were shared), through the C++ decode kernel and through SDPA alone."""
    q_lens, kv_lens = [1, 5, 1, 1, 9, 1, 3], [40, 12, 41, 300, 20, 7, 3]
    prefix_lens = [30, 7, 30, 0, 8, 6, 0]  # 30 shared by a decoding pair; 7 and 8 (prefilling), 6 alone
    if not kernel:
        monkeypatch.setattr(cpu_attention, "supports", lambda query, kv: False)
    step, query = _step(8, 4, 64, dtype, q_lens, kv_lens, seed=3, prefix_lens=prefix_lens)
    shared = attention._per_request(step, query, step.pool.kv[0], 0.125, window)
    copied = _copied(step, query)
    assert torch.equal(shared, attention._per_request(copied, query, copied.pool.kv[0], 0.125, window))
    for i in range(len(q_lens)):  # and both are attention over prefix + own keys
        q, k, v = _joined(step, query, i)
        first = sum(step.q_lens[:i])
        mask = attention._causal_mask(q.shape[0], k.shape[1], window, "cpu")
        expected = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.float(), v.float(), attn_mask=mask,
                                                  scale=0.125, enable_gqa=True).transpose(0, 1)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(shared[first:first + q.shape[0]].float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 7, 700])
def test_kv_writes_equal_index_copy(cpu_kernels_built, dtype, tokens):
    """The step's new keys and values written in one pass, as two index_copy_ calls wrote them: from
    contiguous rows and from the strided views transformers' attention interface hands over."""
    kv_heads, dim, slots = 4, 24, 2048
    pool = torch.randn(2, kv_heads, slots, dim).to(dtype)
    where = torch.randperm(slots)[:tokens]
    k = torch.randn(tokens, kv_heads, dim).to(dtype)
    v = torch.randn(1, kv_heads, tokens, dim).to(dtype)[0].transpose(0, 1)  # [tokens, kv_heads, dim], strided
    expected = pool.clone()
    expected[0].index_copy_(1, where, k.transpose(0, 1))
    expected[1].index_copy_(1, where, v.transpose(0, 1))
    cpu_attention.write(pool, where, k, v)
    assert torch.equal(pool, expected)
    with pytest.raises(RuntimeError, match=f"slot {slots} is not in the pool"):
        cpu_attention.write(pool, torch.full((tokens,), slots), k, v)
    assert torch.equal(pool, expected)  # a refused write changed nothing
