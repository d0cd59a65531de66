"""Where one packed step's tokens and keys are in the KV pool: the bookkeeping attention reads.

A step packs every running request's new tokens into one sequence (`attention.py`). Request i's
keys are two ranges of the pool: its adapter's shared prefix, `prefix_lens[i]` slots from
`prefix_starts[i]` (none without an adapter), then its own segment, from `starts[i]`, holding its
prompt and generated tokens, this forward's last `q_lens[i]` among them. `kv_lens[i]` counts both:
the prefix is at positions 0..P-1 and counts in causal masks and sliding windows as any key.
Host lists, so no device syncs per layer; the device tensors a path needs are built at the
step's first layer and kept for the others.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from .kv_cache import KVPool


@dataclass
class RaggedStep:
    """Where one packed forward's tokens go in the pool, and where each request's keys are."""

    pool: KVPool
    slots: torch.Tensor  # [tokens] the pool slot each packed token's key/value is written to
    starts: list[int]  # per request: its own segment's first slot
    q_lens: list[int]  # per request: its tokens in this forward (1 when decoding, the prompt when new)
    kv_lens: list[int]  # per request: its keys after this forward, prefix included
    prefix_starts: list[int]  # per request: its shared prefix's first slot (0 when it has none)
    prefix_lens: list[int]  # per request: its shared prefix's slots (0: none)
    kernels: bool = True  # whether attention may take a kernel (CPU decode, CUDA varlen); else SDPA per request
    rope_lens: list[int] | None = None  # per request: the length its length-dependent RoPE sees (`rope.py`); None: kv_lens
    _varlen: dict | None = None  # device tensors for the flash path, built on first use
    _decoding: Decoding | None = None  # the decoding requests' view of the step, built on first use
    _ranges: tuple | None = None  # `ranges`, built on first use
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict)  # per (prefilling request, window): its mask

    @property
    def tokens(self) -> int:
        """The step's tokens (a forward padded for a CUDA graph runs more)."""
        return self.slots.shape[0]

    @functools.cached_property
    def all_decoding(self) -> bool:
        """Whether every request of the step decodes (one token each)."""
        return all(n == 1 for n in self.q_lens)

    def own_len(self, i: int) -> int:
        """Request i's keys in its own segment after this forward."""
        return self.kv_lens[i] - self.prefix_lens[i]

    @classmethod
    def build(cls, pool: KVPool, starts: list[int], q_lens: list[int], kv_lens: list[int], kernels: bool = True,
              prefix_starts: list[int] | None = None, prefix_lens: list[int] | None = None) -> RaggedStep:
        """Per request, in packing order: starts, q_lens, kv_lens (prefix included), and its prefix's
        range (none when not given); own segments must not overlap, prefixes may be shared.
        kernels: False keeps attention to one SDPA call per request (`fast_path`)."""
        prefix_starts = prefix_starts or [0] * len(starts)
        prefix_lens = prefix_lens or [0] * len(starts)
        slots = []
        for start, q, kv, p in zip(starts, q_lens, kv_lens, prefix_lens):
            slots.extend(range(start + kv - p - q, start + kv - p))
        return cls(pool, torch.tensor(slots, device=pool.device), starts, q_lens, kv_lens, prefix_starts,
                   prefix_lens, kernels)


def keys(ragged: RaggedStep, kv: torch.Tensor, i: int, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Request i's keys and values from its `lo`-th on, prefix first: each [1, kv_heads, n, head_dim].
    kv: a layer of the pool [2, kv_heads, slots, head_dim]. Views of the pool when they lie in one
    range, a copy of both ranges' rows when they span the prefix and the own segment."""
    p, start, own = ragged.prefix_lens[i], ragged.starts[i], ragged.own_len(i)
    if lo >= p:
        part = kv[:, None, :, start + lo - p:start + own]  # [2, 1, kv_heads, n, head_dim]
        return part[0], part[1]
    pre = ragged.prefix_starts[i]
    both = torch.cat([kv[:, None, :, pre + lo:pre + p], kv[:, None, :, start:start + own]], dim=3)
    return both[0], both[1]


def ranges(ragged: RaggedStep) -> tuple[torch.Tensor, ...]:
    """Every request's (q_lens, starts, kv_lens, prefix_starts, prefix_lens) as int64 tensors on the pool's
    device, as the CPU attention kernel takes them; built at the step's first layer and kept for the others."""
    if ragged._ranges is None:
        longs = functools.partial(torch.tensor, dtype=torch.long, device=ragged.pool.device)
        ragged._ranges = tuple(map(longs, (ragged.q_lens, ragged.starts, ragged.kv_lens, ragged.prefix_starts,
                                           ragged.prefix_lens)))
    return ragged._ranges


@dataclass
class Decoding:
    """A step split for the decode kernels: decoding requests (one query each) and prefilling ones."""

    decode_rows: torch.Tensor  # [decoding] int64, the decoding requests' token rows in the packed step
    q_lens: torch.Tensor  # [decoding] int64 ones: their rows, as the CPU kernel takes them
    starts: torch.Tensor  # [decoding] int64, their own segments' first slots
    kv_lens: torch.Tensor  # [decoding] int64, their keys, prefix included
    prefix_starts: torch.Tensor  # [decoding] int64, their shared prefixes' first slots
    prefix_lens: torch.Tensor  # [decoding] int64, their shared prefixes' slots (0: none)
    max_kv: int  # the longest of kv_lens (0 when none decodes)
    prefills: list[int]  # the prefilling requests, by index
    prefill_rows: torch.Tensor  # [prefill tokens] int64, their token rows, in packing order


def decoding(ragged: RaggedStep) -> Decoding:
    """The step's split, built at its first layer and kept for the others."""
    if ragged._decoding is None:
        decoding = [i for i, n in enumerate(ragged.q_lens) if n == 1]
        prefills = [i for i, n in enumerate(ragged.q_lens) if n > 1]
        first_rows = list(itertools.accumulate(ragged.q_lens, initial=0))
        longs = functools.partial(torch.tensor, dtype=torch.long, device=ragged.pool.device)
        ragged._decoding = Decoding(
            decode_rows=longs([first_rows[i] for i in decoding]),
            q_lens=longs([1] * len(decoding)),
            starts=longs([ragged.starts[i] for i in decoding]),
            kv_lens=longs([ragged.kv_lens[i] for i in decoding]),
            prefix_starts=longs([ragged.prefix_starts[i] for i in decoding]),
            prefix_lens=longs([ragged.prefix_lens[i] for i in decoding]),
            max_kv=max((ragged.kv_lens[i] for i in decoding), default=0),
            prefills=prefills,
            prefill_rows=longs([row for i in prefills for row in range(first_rows[i], first_rows[i + 1])]))
    return ragged._decoding
