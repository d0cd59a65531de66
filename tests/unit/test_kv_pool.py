"""The KV pool's allocator and the ragged attention over it, against plain references."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from server.engine import attention, flash_varlen
from server.engine.kv_cache import KVPool

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8


SLOTS = 256


def _pool(slots: int = SLOTS) -> KVPool:
    return KVPool(LAYERS, KV_HEADS, HEAD_DIM, "cpu", torch.float32, slots)


def _fill(pool: KVPool, seg, value: float) -> None:
    pool.kv[:, :, :, seg.start:seg.start + seg.length] = value


def test_first_fit_reuse_and_coalescing():
    pool = _pool()
    a, b, c = pool.allocate(10), pool.allocate(20), pool.allocate(30)
    assert (a.start, b.start, c.start) == (0, 10, 30)
    assert pool.held == 60 and pool.free_slots == SLOTS - 60
    pool.release(b)
    assert pool.allocate(15).start == 10  # first fit: into the hole b left
    pool.release(a)
    assert pool.free[0] == [0, 10]
    d = pool.allocate(5)
    assert d.start == 0
    pool.release(d)
    pool.release(c)  # the hole of c merges with the free tail
    assert pool.free[0] == [0, 10] and pool.free[-1] == [25, SLOTS - 25]


def test_the_pool_never_grows_past_its_size():
    pool = _pool()
    kv = pool.kv
    a = pool.allocate(200)
    with pytest.raises(MemoryError, match="56 free slots, 57 needed"):
        pool.allocate(57)
    with pytest.raises(MemoryError):
        pool.extend(a, SLOTS + 1)
    assert pool.held == 200 and a.capacity == 200
    pool.extend(a, SLOTS)  # exactly full
    assert pool.free == [] and pool.kv is kv and pool.slot_bytes(LAYERS, KV_HEADS, HEAD_DIM, torch.float32) * SLOTS \
        == pool.nbytes()


def test_extend_in_place_or_by_moving_keeps_the_keys():
    pool = _pool()
    a = pool.allocate(8)
    a.length = 8
    _fill(pool, a, 1.0)
    pool.extend(a, 16)  # the slots after it are free: in place
    assert (a.start, a.capacity) == (0, 16) and pool.held == 16
    b = pool.allocate(4)
    b.length = 4
    _fill(pool, b, 2.0)
    pool.extend(a, 24)  # b is in the way: a moves
    assert a.start >= b.start + 4 and a.capacity == 24 and pool.held == 28
    assert (pool.kv[:, :, :, a.start:a.start + 8] == 1.0).all()
    assert (pool.kv[:, :, :, b.start:b.start + 4] == 2.0).all()
    assert [0, 16] in pool.free  # a's old place is free again


def test_scattered_free_slots_are_compacted_when_no_hole_fits():
    """Eight segments with holes between them: 128 slots free in total but no hole over 16; a
    request of 100 slots compacts the pool, and every segment keeps its keys."""
    pool = _pool()
    segs = [pool.allocate(16) for _ in range(16)]
    for i, seg in enumerate(segs):
        seg.length = 10 + i % 6
        _fill(pool, seg, float(i))
    for seg in segs[1::2]:
        pool.release(seg)
    kept = segs[0::2]
    assert pool.free_slots == 128 and max(size for _, size in pool.free) == 16
    big = pool.allocate(100)
    assert pool.compactions == 1 and big.start == 8 * 16
    assert sorted(seg.start for seg in kept) == list(range(0, 128, 16))
    for i, seg in zip(range(0, 16, 2), kept):
        assert (pool.kv[:, :, :, seg.start:seg.end] == float(i)).all()
    # a segment that must grow past every hole moves to the end, keys included
    kept[0].length = 16
    _fill(pool, kept[0], 7.5)
    pool.release(kept[3])
    pool.extend(kept[0], 40)  # 28 + 16 free, but not contiguous
    assert pool.compactions == 2 and (pool.kv[:, :, :, kept[0].start:kept[0].end] == 7.5).all()
    spans = sorted((s.start, s.start + s.capacity) for s in pool.segments)
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:])) and spans[-1][1] <= SLOTS


def test_random_traffic_never_overlaps_or_loses_keys():
    rng = random.Random(0)
    pool = _pool(1024)
    live: dict[int, object] = {}
    for step in range(600):
        op = rng.random()
        try:
            if op < 0.45 or not live:
                seg = pool.allocate(rng.randint(1, 90))
                seg.length = rng.randint(0, seg.capacity)
                live[step] = seg
                _fill(pool, seg, float(step))
            elif op < 0.75:
                tag = rng.choice(list(live))
                seg = live[tag]
                pool.extend(seg, seg.capacity + rng.randint(1, 60))
            else:
                pool.release(live.pop(rng.choice(list(live))))
        except MemoryError:
            assert pool.free_slots < 150
            pool.release(live.pop(rng.choice(list(live))))
        spans = sorted((s.start, s.start + s.capacity) for s in live.values())
        assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:])) and (not spans or spans[-1][1] <= 1024)
        assert pool.held == sum(s.capacity for s in live.values()) and set(pool.segments) == set(live.values())
        for tag, seg in live.items():
            assert (pool.kv[:, :, :, seg.start:seg.end] == float(tag)).all()
        assert pool.held + sum(size for _, size in pool.free) == 1024
    assert pool.compactions > 0


def _reference(q, k, v, window=None, scale=None):
    """q: [n, heads, d] the last n of k/v's positions; k, v: [kv_heads, L, d]. Plain masked softmax."""
    n, heads, _ = q.shape
    rep = heads // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    L = k.shape[1]
    q_pos = torch.arange(L - n, L)[:, None]
    k_pos = torch.arange(L)[None]
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    scores = torch.einsum("nhd,hld->hnl", q, k) * (scale or q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,hld->nhd", scores.softmax(-1), v)


class _Layer(torch.nn.Module):
    layer_idx = 0


@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("window", [None, 5])
def test_ragged_attention_matches_each_request_alone(heads, window):
    """Decoding and prefilling requests in one packed call, their segments scattered in the pool,
    each attending only to its own keys: the same as each request's plain causal attention."""
    torch.manual_seed(0)
    pool = KVPool(1, KV_HEADS, HEAD_DIM, "cpu", torch.float32, slots=128)
    q_lens, kv_lens = [1, 6, 1, 3, 1], [9, 6, 2, 14, 30]
    segs = [pool.allocate(kv + 4) for kv in kv_lens]
    order = [3, 0, 4, 1, 2]  # packing order differs from pool order
    segs, q_lens, kv_lens = [segs[i] for i in order], [q_lens[i] for i in order], [kv_lens[i] for i in order]
    for seg, q, kv in zip(segs, q_lens, kv_lens):  # keys written by earlier steps
        pool.kv[:, :, :, seg.start:seg.start + kv - q].normal_()
    step = attention.RaggedStep.build(pool, [s.start for s in segs], q_lens, kv_lens)
    tokens = sum(q_lens)
    query = torch.randn(1, heads, tokens, HEAD_DIM)
    key, value = torch.randn(1, KV_HEADS, tokens, HEAD_DIM), torch.randn(1, KV_HEADS, tokens, HEAD_DIM)
    out, _ = attention.ragged_attention(_Layer(), query, key, value, attention.NO_MASK, ragged=step,
                                        sliding_window=window)
    assert out.shape == (1, tokens, heads, HEAD_DIM)
    at = 0
    for seg, q, kv in zip(segs, q_lens, kv_lens):
        k = pool.kv[0, 0, :, seg.start:seg.start + kv]
        v = pool.kv[0, 1, :, seg.start:seg.start + kv]
        torch.testing.assert_close(k[:, kv - q:], key[0, :, at:at + q])  # this forward's keys were written
        expected = _reference(query[0, :, at:at + q].transpose(0, 1), k, v, window)
        torch.testing.assert_close(out[0, at:at + q], expected, atol=1e-5, rtol=1e-5)
        at += q


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_installed_attention_leaves_plain_forwards_alone(tmp_path, arch):
    """The model is shared with adapter materialization and anyone calling it directly: without a
    RaggedStep the installed implementation must be transformers' SDPA, padding masks included."""
    from transformers import AutoModelForCausalLM

    from server.demo.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        attention.install(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == attention.NAME
    torch.testing.assert_close(after[mask.bool()], before[mask.bool()], atol=1e-6, rtol=0)


@pytest.mark.parametrize("layers", ["sliding", "mixed"])
def test_sliding_window_model_matches_transformers(tmp_path, layers):
    """A Qwen2 with sliding-window attention, prompts longer than the window: the engine's greedy
    tokens and their log-probabilities equal transformers' own generate (ignoring the window
    changes the log-probabilities by about 0.1 on this model). "mixed": sliding and full layers
    alternate (as Gemma 3's do), so each layer must get its own mask, not the first layer's."""
    from transformers import AutoModelForCausalLM

    from server.demo.tiny import save_tiny_model
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams, Sequence
    from server.model import load_base_model

    types = {"sliding": ["sliding_attention"] * 2, "mixed": ["sliding_attention", "full_attention"]}[layers]
    path = save_tiny_model(tmp_path / f"qwen2-{layers}", "qwen2", use_sliding_window=True, sliding_window=6,
                           layer_types=types)
    base = load_base_model(str(path), dtype="float32")
    assert base.model.config.layer_types == types
    reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    engine = Engine(base.model, base.tokenizer, base.spec)
    prompts = ([5, 9, 12, 7, 30, 41, 8, 9, 10, 11, 12, 13], [20, 21, 22], [40, 41, 42, 43, 44, 45, 46, 47, 48])
    seqs = [engine.submit(Sequence(p, SamplingParams(max_new_tokens=10))) for p in prompts]  # batched together
    while engine.has_work():
        engine.step()
    for prompt, seq in zip(prompts, seqs):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                     output_scores=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(prompt):].tolist()[: len(seq.output_ids)]
        logprobs = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, expected)]
        assert seq.output_ids == expected
        assert seq.logprobs == pytest.approx(logprobs, abs=1e-4)


def _flash_varlen_reference(bottom_right: bool):
    """aten's `_flash_attention_forward` in its variable-length form, on CPU: sequence i's queries are
    q[cu_seq_q[i]:cu_seq_q[i+1]], its keys the `seqused_k[i]` rows from k[cu_seq_k[i]], query heads
    sharing kv heads (GQA); causal aligned to the end of the keys, as flash attention does (or to the
    start). Returns the output and the log-sum-exp of each row's scaled scores [heads, total_q], float32."""

    def flash_forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                      scale=None, seqused_k=None):
        assert q.dim() == k.dim() == v.dim() == 3 and q.stride(-1) == k.stride(-1) == 1
        assert dropout_p == 0.0 and not return_debug_mask
        assert cu_seq_q.dtype == cu_seq_k.dtype == seqused_k.dtype == torch.int32
        assert len(cu_seq_k) == len(cu_seq_q) == len(seqused_k) + 1
        outs, lses = [], []
        for i in range(len(cu_seq_q) - 1):
            qs, qe, ks, n = int(cu_seq_q[i]), int(cu_seq_q[i + 1]), int(cu_seq_k[i]), int(seqused_k[i])
            assert qe - qs <= max_q and n <= max_k and ks + n <= k.shape[0] and n > 0
            qi, ki, vi = q[qs:qe].transpose(0, 1), k[ks:ks + n].transpose(0, 1), v[ks:ks + n].transpose(0, 1)
            offset = n - (qe - qs) if bottom_right else 0
            mask = torch.arange(n)[None] <= torch.arange(qe - qs)[:, None] + offset
            if not is_causal:
                mask = torch.ones_like(mask)
            o = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], attn_mask=mask, scale=scale,
                                               enable_gqa=q.shape[1] != k.shape[1])
            outs.append(o[0].transpose(0, 1))
            ki = ki.repeat_interleave(q.shape[1] // k.shape[1], dim=0)  # [heads, n, head_dim]
            scores = (qi.float() @ ki.float().transpose(1, 2)) * (scale or q.shape[-1] ** -0.5)
            lses.append(torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1))  # [heads, rows]
        return torch.cat(outs), torch.cat(lses, dim=1), None, None, None

    return flash_forward


def test_varlen_path_builds_flash_arguments_right(monkeypatch):
    """The CUDA path's bookkeeping (per-request key starts out of order, used lengths, GQA, causal
    alignment, prefixes shared and absent merged by their log-sum-exps), checked on CPU against a
    reference of flash attention's varlen semantics; and the start-up self-check rejects a kernel
    that aligns the causal mask differently."""
    monkeypatch.setattr(flash_varlen, "_FLASH_VARLEN", _flash_varlen_reference(bottom_right=True))
    assert flash_varlen.self_check(torch.device("cpu"), torch.float32, 4, 2, HEAD_DIM)
    assert flash_varlen.self_check(torch.device("cpu"), torch.float32, 4, 4, HEAD_DIM)
    monkeypatch.setattr(flash_varlen, "_FLASH_VARLEN", _flash_varlen_reference(bottom_right=False))
    assert not flash_varlen.self_check(torch.device("cpu"), torch.float32, 4, 2, HEAD_DIM)


def test_varlen_merge_of_a_shared_prefix_equals_attention_over_both(monkeypatch):
    """Two requests on one shared prefix, one on none, prefilling and decoding: the two flash calls
    merged equal SDPA over the prefix and own keys joined, request by request."""
    monkeypatch.setattr(flash_varlen, "_FLASH_VARLEN", _flash_varlen_reference(bottom_right=True))
    torch.manual_seed(2)
    pool = KVPool(1, KV_HEADS, HEAD_DIM, "cpu", torch.float32, slots=256)
    prefix = pool.allocate(20)
    segs = [pool.allocate(n) for n in (40, 12, 30)]
    pool.kv.normal_()
    q_lens, kv_lens, prefix_lens = [1, 6, 3], [20 + 33, 20 + 6, 25], [20, 20, 0]
    step = attention.RaggedStep.build(pool, [s.start for s in segs], q_lens, kv_lens, True,
                                      [prefix.start, prefix.start, 0], prefix_lens)
    q = torch.randn(sum(q_lens), 4, HEAD_DIM)
    out = flash_varlen.attend(step, q, pool.kv[0], 0.2)
    at = 0
    for seg, n, kv_len, p in zip(segs, q_lens, kv_lens, prefix_lens):
        own = kv_len - p
        k = torch.cat([pool.kv[0, 0, :, prefix.start:prefix.start + p], pool.kv[0, 0, :, seg.start:seg.start + own]], 1)
        v = torch.cat([pool.kv[0, 1, :, prefix.start:prefix.start + p], pool.kv[0, 1, :, seg.start:seg.start + own]], 1)
        expected = _reference(q[at:at + n], k, v, None, scale=0.2)
        torch.testing.assert_close(out[at:at + n], expected, atol=1e-5, rtol=1e-5)
        at += n


def test_last_segment_grows_in_place():
    pool = _pool(4096)
    a = pool.allocate(32)
    a.length = 32
    _fill(pool, a, 3.0)
    for capacity in range(64, 4000, 32):  # one request decoding alone: never copied
        pool.extend(a, capacity)
        assert a.start == 0 and a.capacity == capacity
    assert (pool.kv[:, :, :, :32] == 3.0).all() and pool.compactions == 0


def test_models_outside_the_attention_interface_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    config = GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                          attention_types=[[["global", "local"], 1]], max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="GPTNeoForCausalLM does not use transformers' attention interface"):
        attention.install(model)


def test_varlen_failing_at_run_time_falls_back_to_per_request(monkeypatch, caplog):
    """A flash kernel that passed its self-check but raises on a later step's shapes: that step is
    attended per request, and the flash path is not used again."""
    torch.manual_seed(0)
    pool = KVPool(1, KV_HEADS, HEAD_DIM, "cpu", torch.float32, slots=32)
    pool.kv.normal_()  # the keys written before this step
    segs = [pool.allocate(12) for _ in range(2)]
    step = attention.RaggedStep.build(pool, [s.start for s in segs], [1, 4], [7, 4])
    query = torch.randn(1, 4, 5, HEAD_DIM)
    key, value = torch.randn(1, KV_HEADS, 5, HEAD_DIM), torch.randn(1, KV_HEADS, 5, HEAD_DIM)
    expected, _ = attention.ragged_attention(_Layer(), query, key, value, attention.NO_MASK, ragged=step)

    def refuses(*args):
        raise RuntimeError("max_seqlen_k exceeds the kernel's limit")

    monkeypatch.setattr(flash_varlen, "usable", lambda *args: True)
    monkeypatch.setattr(flash_varlen, "attend", refuses)
    monkeypatch.setattr(flash_varlen, "_OK", {})
    out, _ = attention.ragged_attention(_Layer(), query, key, value, attention.NO_MASK, ragged=step)
    torch.testing.assert_close(out, expected)
    assert list(flash_varlen._OK.values()) == [False]
    assert "attending per request from now on" in caplog.text


SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=259)


@pytest.mark.parametrize("arch, config, refusal", [
    ("llama4_text", dict(num_hidden_layers=4, intermediate_size_mlp=128, num_local_experts=2, attention_chunk_size=16),
     "Llama4ForCausalLM uses chunked attention \\(attention_chunk_size 16\\)"),
    ("gemma", dict(num_hidden_layers=2, use_bidirectional_attention=True), "GemmaForCausalLM uses bidirectional attention"),
    ("gemma3_text", dict(num_hidden_layers=2), None),  # sliding and full layers: served (test_sliding_window_model_...)
])
def test_mask_features_the_packed_step_ignores_are_refused(arch, config, refusal):
    """Features that live in transformers' masks alone (the packed step passes none): refused at start-up,
    not served wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **SMALL, **config))
    if refusal is None:
        attention.install(model)
    else:
        with pytest.raises(ValueError, match=refusal):
            attention.install(model)
