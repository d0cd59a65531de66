"""CUDA, half precision: a packed step's attention in variable-length flash attention calls.

FlashAttention-2's variable-length forward (aten's `_flash_attention_forward`, the op under
`torch.nn.attention.varlen`, whose wrapper in torch 2.11 takes neither GQA nor `seqused_k`) reads
each sequence's keys from one contiguous range: `seqused_k[i]` rows from `cu_seq_k[i]`. A request's
keys are two ranges (its adapter's shared prefix, then its own segment: `ragged.py`), so a layer
takes two calls over the pool in place, no keys copied, and merges them, as cascade attention does
(FlashInfer's, vLLM's `merge_attn_states`):
- every request's queries against its own segment, causal aligned to its end (keys P.. of P + n);
- the queries of the requests with a prefix against it, not causal: every prefix key precedes them;
- per query row and head, the two partial outputs weighted by their softmax denominators, from the
  log-sum-exps the kernel returns ([heads, total_q], float32): o = (o1 e^l1 + o2 e^l2) / (e^l1 + e^l2).
That is exactly softmax over the concatenated keys. A request without a prefix takes the first call
alone. The path is used once a self-check on first use, with prefixes shared and absent, shows it
matches the per-request path (`attention._per_request`); any failure falls back to that for good.

No GPU runs the tests: tests/unit/test_kv_pool.py puts a CPU reference of the kernel's varlen
semantics at `_FLASH_VARLEN`, and checks this module's index building and merge against it.
"""

from __future__ import annotations

import logging

import torch

from .kv_cache import KVPool
from .ragged import RaggedStep

log = logging.getLogger(__name__)

_OK: dict[tuple, bool] = {}  # per (device, dtype, heads, kv_heads, head_dim): the self-check's verdict


def _key(q, kv_heads: int) -> tuple:
    return q.device, q.dtype, q.shape[1], kv_heads, q.shape[2]


def usable(q, kv_heads: int, window) -> bool:
    """Whether this layer may take the flash path: CUDA, half precision, no sliding window, self-check passed."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or window:
        return False
    key = _key(q, kv_heads)
    if key not in _OK:
        _OK[key] = self_check(*key)
    return _OK[key]


def disable(q, kv_heads: int) -> None:
    """A call failed at run time: per request from now on, for these shapes."""
    _OK[_key(q, kv_heads)] = False


def _arguments(ragged: RaggedStep, device) -> dict:
    """The calls' index tensors, built at the step's first layer and kept for the others."""
    if ragged._varlen is None:
        ints = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        n = len(ragged.q_lens)
        cu_q = [0]
        for q in ragged.q_lens:
            cu_q.append(cu_q[-1] + q)
        own = [ragged.own_len(i) for i in range(n)]
        args = dict(own=(ints(cu_q), ints(ragged.starts + [ragged.pool.slots]), max(ragged.q_lens), max(own),
                         ints(own)))
        with_prefix = [i for i in range(n) if ragged.prefix_lens[i]]
        if with_prefix:
            q_lens = [ragged.q_lens[i] for i in with_prefix]
            cu_p = [0]
            for q in q_lens:
                cu_p.append(cu_p[-1] + q)
            lens = [ragged.prefix_lens[i] for i in with_prefix]
            args["rows"] = torch.tensor([row for i in with_prefix for row in range(cu_q[i], cu_q[i + 1])],
                                        dtype=torch.long, device=device)  # their query rows in the step
            args["prefix"] = (ints(cu_p), ints([ragged.prefix_starts[i] for i in with_prefix] + [ragged.pool.slots]),
                              max(q_lens), max(lens), ints(lens))
        ragged._varlen = args
    return ragged._varlen


def attend(ragged: RaggedStep, q, kv, scaling) -> torch.Tensor:
    """[tokens, heads, head_dim]: q [tokens, heads, head_dim] contiguous against each request's
    prefix and own segment; kv: a layer of the pool [2, kv_heads, slots, head_dim]."""
    args = _arguments(ragged, q.device)
    k, v = kv[0].transpose(0, 1), kv[1].transpose(0, 1)  # [slots, kv_heads, head_dim]
    cu_q, cu_k, max_q, max_k, used = args["own"]
    out, lse = _FLASH_VARLEN(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scaling, seqused_k=used)[:2]
    if "prefix" not in args:
        return out
    rows = args["rows"]
    cu_q, cu_k, max_q, max_k, used = args["prefix"]
    pre, pre_lse = _FLASH_VARLEN(q.index_select(0, rows), k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                 scale=scaling, seqused_k=used)[:2]
    merged = merge(out.index_select(0, rows), lse.index_select(1, rows), pre, pre_lse)
    if "has_prefix" in args:  # a recorded step (cuda_graphs.py): every row took the prefix call, even with none
        merged = torch.where(args["has_prefix"][:, None, None], merged, out.index_select(0, rows))
    out.index_copy_(0, rows, merged)
    return out


def merge(a: torch.Tensor, a_lse: torch.Tensor, b: torch.Tensor, b_lse: torch.Tensor) -> torch.Tensor:
    """Softmax attention over two sets of keys from each's: a, b [rows, heads, head_dim]; a_lse, b_lse
    [heads, rows] float32, the log of each softmax's denominator. Computed in float32."""
    a_lse, b_lse = a_lse.t()[..., None], b_lse.t()[..., None]  # [rows, heads, 1]
    top = torch.maximum(a_lse, b_lse)
    wa, wb = torch.exp(a_lse - top), torch.exp(b_lse - top)
    return ((a.float() * wa + b.float() * wb) / (wa + wb)).to(a.dtype)


_FLASH_VARLEN = torch.ops.aten._flash_attention_forward  # a name of ours, so that tests put a CPU reference here


def self_check(device, dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Run both paths on small random steps (prefill and decode mixed, with one prefix shared by two
    requests, one alone and none; then decode only, keys longer than a kernel block); use the flash
    path only if it works and agrees."""
    from .attention import _per_request  # the reference: a module that imports this one

    try:
        for q_lens, kv_lens, prefix_lens in (([1, 7, 1, 3], [17, 20, 50, 9], [0, 5, 5, 4]),
                                             ([1, 1, 1], [300, 1, 41], [0, 0, 0]),
                                             ([1, 1, 4], [300, 140, 36], [200, 130, 0])):
            pool = KVPool(1, kv_heads, head_dim, device, dtype, slots=1024)
            prefixes = {p: pool.allocate(p).start for p in set(prefix_lens) if p}  # one per length: 5 is shared
            segs = [pool.allocate(kv - p + 8) for kv, p in zip(kv_lens[::-1], prefix_lens[::-1])][::-1]  # out of order
            pool.kv.normal_()
            step = RaggedStep.build(pool, [s.start for s in segs], q_lens, kv_lens, True,
                                    [prefixes.get(p, 0) for p in prefix_lens], prefix_lens)
            q = torch.randn(sum(q_lens), heads, head_dim, device=device, dtype=dtype)
            fast = attend(step, q, pool.kv[0], None).float()
            slow = _per_request(step, q, pool.kv[0], None, None).float()
            if not torch.allclose(fast, slow, atol=2e-2, rtol=2e-2):
                log.warning("variable-length flash attention disagrees with the reference; attending per request")
                return False
    except Exception as exc:  # an older GPU or a build without flash attention
        log.warning("variable-length flash attention unavailable (%s); attending per request", exc)
        return False
    return True
