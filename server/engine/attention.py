"""Attention over the KV pool for one packed step: every running request's new tokens in one sequence.

The engine runs the model on `input_ids [1, tokens]`: one token per decoding request and the
whole prompt of each newcomer, back to back with no padding. This module registers an attention
implementation with transformers that, given a `RaggedStep` in the forward's keyword arguments,
writes each layer's new keys/values into the requests' pool segments and attends each request's
queries to its own keys only (causal, aligned to their end). Forwards without a `RaggedStep`
(adapter materialization, plain `generate`) run transformers' own SDPA attention.

A request's keys are two ranges of the pool (`ragged.py`): its adapter's prefix, written once and
shared by every running request on that adapter version (`kv_cache.SharedPrefix`), then its own
segment (prompt + generated). Each request attends over exactly those keys, so no compute or memory
goes to padding. On CPU the whole step, decoding and prefilling requests alike, goes to one call of
a C++ kernel (`cpu_attention`, float32 and bfloat16, when it builds; it reads both ranges in place,
each query row on its own, so a prompt's outputs do not depend on its chunking or its step's other
requests); on CPUs without AVX-512, where its portable loops are slower than SDPA on prompt rows,
the kernel takes the decoding requests and each prefilling request one SDPA call over its prefix and
own keys, concatenated, as every request does without the kernel. On accelerators the decoding
requests take one SDPA call over a padded window, and each prefilling request one SDPA call. On CUDA
with half precision the whole step is variable-length flash attention (`flash_varlen.py`: own
segments and prefixes in two calls, merged by their log-sum-exps), used once a self-check on first
use shows it matches the per-request path.

What the project relies on in transformers beyond its documented API, and the test guarding each
(`self_check.py` also checks the whole packed forward against transformers' own at every start):
- the attention implementation registered by name (`AttentionInterface`, `AttentionMaskInterface`)
  and set with `set_attn_implementation`, read back from `config._attn_implementation`:
  tests/unit/test_kv_pool.py::test_installed_attention_leaves_plain_forwards_alone, ::test_models_outside_the_attention_interface_are_refused;
- `sdpa_attention_forward` for forwards without a RaggedStep, and `sdpa_mask` as our mask function:
  test_kv_pool.py::test_installed_attention_leaves_plain_forwards_alone, tests/unit/test_adapters.py (materialization);
- the forward's keyword arguments (`ragged`) reaching the attention function, and each attention
  module's `layer_idx` and `sliding_window`: test_kv_pool.py::test_ragged_attention_matches_each_request_alone,
  ::test_sliding_window_model_matches_transformers;
- the empty 4-D mask (`NO_MASK`) passed through untouched: tests/unit/test_engine.py::test_mixed_batch_equals_alone_and_peft;
- `logits_to_keep` as a tensor of row indices (model_runner.py): test_engine.py::test_mixed_batch_equals_alone_and_peft;
- position ids restarting at each request inside one packed sequence: test_engine.py::test_mixed_batch_equals_alone_and_peft,
  test_kv_pool.py::test_sliding_window_model_matches_transformers;
- the configuration fields masking_utils builds masks from (`layer_types`, `attention_chunk_size`,
  `is_causal`, `use_bidirectional_attention`), read by `_masks_we_ignore` to refuse what the packed step
  does not do: test_kv_pool.py::test_mask_features_the_packed_step_ignores_are_refused;
- the cache object a forward returns with `use_cache=True` (`cache`, `past_key_values` before 5.24),
  read by adapters/adapter.py's `virtual_tokens_to_kv`: test_adapters.py::test_greedy_tokens_equal_peft.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from . import flash_varlen
from .cpu import attention as cpu_attention
from .ragged import RaggedStep, decoding, keys, ranges

__all__ = ["NAME", "NO_MASK", "RaggedStep", "attend", "decoding", "install", "ragged_attention", "whole_step_on_kernel"]

log = logging.getLogger(__name__)

NAME = "softprompt_ragged"
NO_MASK = torch.empty(1, 1, 0, 0)  # a 4-D mask: transformers passes it through untouched, we ignore it


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, ragged=None,
                     sliding_window=None, **kwargs):
    """transformers' attention interface. query: [1, heads, tokens, head_dim]; key, value: [1, kv_heads,
    tokens, head_dim] (this forward's)."""
    if ragged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    unsupported = [name for name in ("softcap", "s_aux") if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"attention with {', '.join(unsupported)} is not supported")
    window = sliding_window or getattr(module, "sliding_window", None)
    out = attend(ragged, module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                 scaling, window)
    return out[None], None  # [1, tokens, heads, head_dim]


def attend(ragged: RaggedStep, layer: int, q, k, v, scaling, window) -> torch.Tensor:
    """Write layer `layer`'s new keys/values into the pool, attend: [tokens, heads, head_dim].
    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] (this forward's)."""
    padded, tokens = q.shape[0], ragged.tokens
    if padded != tokens:  # a step padded to a CUDA graph's size: the padding attends nothing, reads zeros
        q, k, v = q[:tokens], k[:tokens], v[:tokens]
    kv = ragged.pool.kv[layer]  # [2, kv_heads, slots, head_dim]
    if ragged.kernels and cpu_attention.supports(q, kv) and k.stride(-1) == v.stride(-1) == 1:
        cpu_attention.write(kv, ragged.slots, k, v)
    else:
        kv[0].index_copy_(1, ragged.slots, k.transpose(0, 1))
        kv[1].index_copy_(1, ragged.slots, v.transpose(0, 1))
    q = q.contiguous()
    out = None
    if ragged.kernels and flash_varlen.usable(q, kv.shape[1], window):
        try:
            out = flash_varlen.attend(ragged, q, kv, scaling)
        except Exception as exc:  # a shape or length the kernel refuses: per request from now on
            log.warning("variable-length flash attention failed (%s); attending per request from now on", exc)
            flash_varlen.disable(q, kv.shape[1])
    if out is None:
        out = _per_request(ragged, q, kv, scaling, window)
    if padded != tokens:
        out = torch.cat([out, out.new_zeros(padded - tokens, *out.shape[1:])])
    return out


def _per_request(ragged: RaggedStep, q, kv, scaling, window) -> torch.Tensor:
    """[tokens, heads, head_dim]: each request's queries (q [tokens, heads, head_dim], contiguous) against
    its prefix and own segment, in packing order. On CPU the `cpu_attention` kernel takes the whole step
    in one call where its prefill rows pay (its AVX-512 code), else its decoding rows, the prefilling
    requests then one SDPA call each; on an accelerator the decoding requests take one padded SDPA
    call and prefilling requests one SDPA call each; without either kernel every request one SDPA call."""
    if q.device.type == "cpu":
        if not ragged.kernels or not cpu_attention.supports(q, kv):
            return torch.cat(_sdpa_each(ragged, q, kv, scaling, window, range(len(ragged.q_lens))))
        if whole_step_on_kernel(ragged):
            return cpu_attention.attend(q, kv, *ranges(ragged), scaling, window)
        return _decode_and_sdpa(ragged, q, kv, scaling, window, _cpu_decode)
    # cuDNN's attention builds a plan for every new shape (seconds, per prompt length): not for ragged steps
    with sdpa_kernel(_ACCELERATOR_SDPA):
        return _decode_and_sdpa(ragged, q, kv, scaling, window, _padded_step)


def whole_step_on_kernel(ragged: RaggedStep) -> bool:
    """Whether the CPU kernel takes all of this step's rows (once `cpu_attention.supports` said it runs):
    where its prompt rows pay (its AVX-512 code), or when every request decodes."""
    return cpu_attention.prefill_pays() or ragged.all_decoding


_ACCELERATOR_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _decode_and_sdpa(ragged: RaggedStep, q, kv, scaling, window, decode) -> torch.Tensor:
    """The decoding requests in one `decode(step, q, kv, scaling, window)` call, each prefilling one in an SDPA call."""
    step = decoding(ragged)
    if not step.prefills:
        return decode(step, q, kv, scaling, window)
    out = torch.empty_like(q)
    if len(step.decode_rows):
        out.index_copy_(0, step.decode_rows, decode(step, q[step.decode_rows], kv, scaling, window))
    out.index_copy_(0, step.prefill_rows, torch.cat(_sdpa_each(ragged, q, kv, scaling, window, step.prefills)))
    return out


def _cpu_decode(step, q, kv, scaling, window) -> torch.Tensor:
    """The decoding requests' rows on the CPU kernel."""
    return cpu_attention.attend(q, kv, step.q_lens, step.starts, step.kv_lens, step.prefix_starts, step.prefix_lens,
                                scaling, window)


def _padded_step(step, q, kv, scaling, window) -> torch.Tensor:
    return _padded_decode(step.max_kv, q, kv, step.starts, step.kv_lens, step.prefix_starts, step.prefix_lens,
                          scaling, window)


PADDED_DECODE_ELEMENTS = 1 << 26  # keys gathered per call at most (x2 for values): bounds the transient copy


def _padded_decode(max_kv: int, q, kv, starts, kv_lens, prefix_starts, prefix_lens, scaling, window) -> torch.Tensor:
    """One decoding query per request on any device: each request's keys (prefix, then own segment)
    gathered into a window of the longest one's length, masked, one SDPA call (per group of requests, so
    the gathered copy stays under PADDED_DECODE_ELEMENTS). q: [requests, heads, head_dim]; starts,
    kv_lens, prefix_starts, prefix_lens: [requests] int64, as `cpu_attention.attend` takes them."""
    requests, heads, head_dim = q.shape
    kv_heads = kv.shape[1]
    offsets = torch.arange(max_kv, device=q.device)  # [max_kv]
    per_call = max(1, PADDED_DECODE_ELEMENTS // (max_kv * kv_heads * head_dim))
    outs = []
    for first in range(0, requests, per_call):
        rows = slice(first, first + per_call)
        lens, pre = kv_lens[rows, None], prefix_lens[rows, None]  # [n, 1]
        slots = torch.where(offsets < pre, prefix_starts[rows, None] + offsets, starts[rows, None] + offsets - pre)
        slots = slots.clamp_(min=0, max=kv.shape[2] - 1)  # [n, max_kv]
        keep = offsets < lens  # [n, max_kv]
        if window:
            keep &= offsets >= lens - window
        k = kv[0][:, slots].transpose(0, 1)  # [n, kv_heads, max_kv, head_dim]
        v = kv[1][:, slots].transpose(0, 1)
        group = q[rows].view(-1, kv_heads, heads // kv_heads, head_dim)  # a kv head's query heads as its rows
        o = F.scaled_dot_product_attention(group, k, v, attn_mask=keep[:, None, None, :], scale=scaling)
        outs.append(o.reshape(-1, heads, head_dim))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _sdpa_each(ragged: RaggedStep, step_q, kv, scaling, window, requests) -> list[torch.Tensor]:
    """One SDPA call per request of `requests` (indices); step_q: [tokens, heads, head_dim], the whole step's.
    Returns each one's [n, heads, head_dim]."""
    heads, kv_heads, head_dim = step_q.shape[1], kv.shape[1], step_q.shape[2]
    queries = step_q.split(ragged.q_lens)  # [n, heads, head_dim] each
    outs = []
    for i in requests:
        q, kv_len = queries[i], ragged.kv_lens[i]
        n = q.shape[0]
        if n == 1:  # decoding: the query heads of a kv head group become its query rows, no mask needed
            k, v = keys(ragged, kv, i, kv_len - window if window and kv_len > window else 0)
            o = F.scaled_dot_product_attention(q.view(1, kv_heads, heads // kv_heads, head_dim), k, v, scale=scaling)
            outs.append(o.reshape(1, heads, head_dim))  # CUDA's memory-efficient kernel returns it strided
        else:
            k, v = keys(ragged, kv, i)
            mask = ragged._masks.get((i, window))  # built at the first layer with this window, kept for the others
            if mask is None:
                mask = ragged._masks[i, window] = _causal_mask(n, kv_len, window, q.device)
            if q.device.type == "cpu" and q.dtype != torch.float32:  # batch-invariant: see _exact_prefill
                o = _exact_prefill(q, k, v, mask, scaling, heads != kv_heads)
            else:
                o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, scale=scaling,
                                                   enable_gqa=heads != kv_heads)
            outs.append(o[0].transpose(0, 1))
    return outs


def _exact_prefill(q, k, v, mask, scaling, gqa: bool) -> torch.Tensor:
    """A prefill chunk's SDPA on CPU in half precision, computed in float32 and rounded once at the end.

    How a prompt is cut into chunks depends on what else is in the step (the prefill budget is
    shared), and CPU SDPA in bfloat16 rounds a query row differently with the chunk's length (its
    matmuls block by it). So the same request could get other tokens when it arrived beside others:
    measured on the bench model in bfloat16 with the AVX2 linear kernel, 3 to 9 of 64 requests
    differed between submitting them at once and one by one. In float32 the rows come out the same
    (64 of 64 in every grouping), for a small cost: prefill attention is a few percent of a prefill."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), k.float(), v.float(), attn_mask=mask,
                                       scale=scaling, enable_gqa=gqa)
    return o.to(q.dtype)


def _causal_mask(n: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """[n, kv_len] bool: query i (the (kv_len - n + i)-th key) sees keys up to itself, within `window`."""
    q_pos = torch.arange(kv_len - n, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return mask


def install(model) -> None:
    """Route the model's attention through `ragged_attention` (plain SDPA when no RaggedStep is given),
    a graph break under torch.compile (`compiled.py`): it stays eager, the rest of the forward compiles.

    Raises ValueError for models whose attention does not go through transformers' attention
    interface, or that need what the ragged path does not do (logit soft-capping, attention sinks,
    anything in their masks other than causal attention with an optional sliding window: `_masks_we_ignore`).
    """
    name = type(model).__name__
    if not type(model).is_backend_compatible():
        raise ValueError(f"{name} does not use transformers' attention interface, so its keys and values "
                         "cannot be served from the adapter KV pool; this architecture is not supported")
    if getattr(model.config, "attn_logit_softcapping", None) or any(hasattr(m, "sinks") for m in model.modules()):
        raise ValueError(f"{name} uses attention logit soft-capping or attention sinks, which the adapter "
                         "KV pool's attention does not implement; this architecture is not supported")
    ignored = _masks_we_ignore(model.config.get_text_config())
    if ignored:
        raise ValueError(f"{name} uses {'; '.join(ignored)}, which the adapter KV pool's attention does not "
                         "implement (it attends causally, with an optional sliding window); this model is not supported")
    AttentionInterface.register(NAME, torch.compiler.disable(ragged_attention))
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise ValueError(f"{name} refused the attention implementation the engine needs")


SERVED_LAYER_TYPES = {"full_attention", "sliding_attention"}  # the layer types whose masks the ragged path computes


def _masks_we_ignore(config) -> list[str]:
    """What the model's masks (transformers' masking_utils) would do that the packed step does not:
    it passes no mask (NO_MASK) and attends causally, within each layer's sliding window."""
    found = []
    layer_types = getattr(config, "layer_types", None) or []
    chunk = getattr(config, "attention_chunk_size", None)
    if "chunked_attention" in layer_types or (chunk and not layer_types):
        found.append(f"chunked attention (attention_chunk_size {chunk})")
    others = sorted(set(layer_types) - SERVED_LAYER_TYPES - {"chunked_attention"})
    if others:
        found.append(f"layers of type {', '.join(others)}")
    if getattr(config, "is_causal", True) is False or getattr(config, "use_bidirectional_attention", None):
        found.append("bidirectional attention")
    return found
