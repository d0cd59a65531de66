"""The running requests' key/value memory: one pool of token slots, sized once; a contiguous segment
per request, and one shared segment per adapter prefix in use.

Layout: `kv[layer, k|v, kv_head, slot, head_dim]`. An adapter's prefix (the per-layer keys and values
every adapter kind, prompt tuning included, materializes to) is written once into a shared segment
(`SharedPrefix`), keyed by `Adapter.prefix_key` (name, content version, task), and counted by the
requests using it: 64 requests on one adapter hold one copy. A request's own segment holds its
prompt, then the tokens it feeds back, in position order with no padding: prompt + generated
slots, plus at most `GROWTH_SLOTS - 1` not yet written. Attention reads two ranges per request,
the shared prefix (positions 0..P-1) then its own segment (positions P..); a request without an
adapter has an empty prefix. Segments grow in place when the slots after them are free, else move;
they return to the pool when the request ends or is preempted. A shared prefix returns to the
pool when the last running request using it lets go of it (no idle prefix is kept: the pool
holds only what running requests read, so nothing has to be evicted to admit, and a prefix
costs one copy of `Adapter.kv` to write again; the adapter's materialized prefix stays in the
adapter cache either way). A request keeps the prefix it started with: a replaced adapter's
new version has another key, so the old version's segment lives on with the requests holding it.

The pool is allocated once, at the size of the KV budget, and never grows: the scheduler admits
and preempts so that what the running requests hold always fits (`Ledger`: each shared prefix
charged once, to the request that brings it in). Free space is a sorted list of coalesced
intervals handed out first fit; when no interval is large enough but enough slots are free in
total, the segments, shared ones included, are compacted to the pool's start.
On CPU the pool is `torch.empty`, so the operating system commits its pages only as they are
first written: an idle server with a large budget costs nothing.

Measured with `python -m bench.kv_budget --shared` (64 requests x 64 tokens over 4 adapters of 128
virtual tokens, the bench model in float32): 9,135 slots (142.7 MiB) held at the peak, 512 of them
prefixes, against 16,815 (262.7 MiB, 8,192) with a copy per request; 4 prefixes written instead of
64; the same tokens. Throughput and the decode kernel's time: bench/README.md.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass

import torch

GROWTH_SLOTS = 32  # a segment is extended by this many slots (at most) when it runs out
DEFAULT_KV_CACHE_BYTES = 2 * 1024**3  # on CPU; on a GPU the server's default is a share of free memory


class Segment:
    """One request's own slots, or a shared prefix's: `[start, start + capacity)`, of which the first `length`
    are written.

    Setting `length` keeps its pool's count of written slots (`KVPool.written`) up to date, so that
    another thread (a /metrics scrape) reads one number instead of walking the segments as the
    engine thread changes them."""

    __slots__ = ("_pool", "start", "capacity", "_length")

    def __init__(self, pool: KVPool | None, start: int, capacity: int):
        self._pool = pool  # None once released
        self.start = start
        self.capacity = capacity
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        if self._pool is not None:
            self._pool.written += n - self._length
        self._length = n

    @property
    def end(self) -> int:
        return self.start + self.length

    def __repr__(self) -> str:
        return f"Segment(start={self.start}, capacity={self.capacity}, length={self.length})"


@dataclass(eq=False)
class SharedPrefix:
    """An adapter prefix written once in the pool, read by every running request that uses it."""

    key: tuple  # the adapter's `prefix_key`
    segment: Segment  # its slots: capacity == length == the prefix's tokens
    refs: int = 0  # running requests holding it


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device, dtype, slots: int):
        self.dims = (num_layers, num_kv_heads, head_dim)
        self.device, self.dtype = torch.device(device), dtype
        # zeros on accelerators: their attention kernels may load (masked) slots past a segment's end
        make = torch.empty if self.device.type == "cpu" else torch.zeros
        self.kv = make(num_layers, 2, num_kv_heads, slots, head_dim, device=self.device, dtype=dtype)
        self.segments: set[Segment] = set()  # every segment handed out and not released
        self.free: list[list[int]] = [[0, slots]] if slots else []  # sorted, coalesced [start, size] intervals
        self.held = 0  # slots held by segments
        self.written = 0  # of them, slots holding keys and values (kept by `Segment.length`)
        self.compactions = 0
        self.prefixes: dict[tuple, SharedPrefix] = {}  # by key: the shared prefixes some request holds
        self.reserved = 0  # slots held for the runner's own use (the CUDA graphs' scratch), not requests'

    @staticmethod
    def slot_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        """Bytes one token's keys and values take over all layers."""
        return num_layers * 2 * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def slots(self) -> int:
        return self.kv.shape[3]

    @property
    def free_slots(self) -> int:
        return self.slots - self.held

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def allocate(self, capacity: int) -> Segment:
        """A new segment; MemoryError when fewer than `capacity` slots are free."""
        start = self._take(capacity)
        seg = Segment(self, start, capacity)
        self.segments.add(seg)
        return seg

    def release(self, seg: Segment) -> None:
        self.segments.discard(seg)
        self._give(seg.start, seg.capacity)
        self.held -= seg.capacity
        seg.capacity = seg.length = 0
        seg._pool = None

    def clear(self) -> None:
        """Drop every segment, shared prefixes too (after a failed step); the memory stays allocated."""
        for seg in list(self.segments):
            self.release(seg)
        self.prefixes.clear()

    def acquire_prefix(self, key: tuple, prefix: torch.Tensor) -> SharedPrefix:
        """The shared segment of prefix `key`, one more holder counted: the resident one, or a new one
        with `prefix` [layers, 2, kv_heads, n, head_dim] written in. MemoryError when it does not fit."""
        shared = self.prefixes.get(key)
        if shared is None:
            seg = self.allocate(prefix.shape[3])
            try:
                self.write_prefix(seg, prefix)
            except BaseException:
                self.release(seg)
                raise
            shared = self.prefixes[key] = SharedPrefix(key, seg)
        shared.refs += 1
        return shared

    def release_prefix(self, shared: SharedPrefix) -> None:
        """One holder fewer; the last one gives the slots back."""
        shared.refs -= 1
        if shared.refs == 0 and self.prefixes.get(shared.key) is shared:
            del self.prefixes[shared.key]
            self.release(shared.segment)

    def extend(self, seg: Segment, capacity: int) -> None:
        """Make `seg` hold `capacity` slots: in place if the slots after it are free, else by moving
        it. MemoryError when too few slots are free."""
        extra = capacity - seg.capacity
        if extra <= 0:
            return
        after = seg.start + seg.capacity
        i = bisect.bisect_left(self.free, [after, 0])
        if i < len(self.free) and self.free[i][0] == after and self.free[i][1] >= extra:
            self._cut(i, extra)
            self.held += extra
            seg.capacity = capacity
            return
        if self.free_slots < extra:
            raise MemoryError(f"the KV pool has {self.free_slots} free slots, {extra} more needed")
        # Move: give the old slots back first, so that the segment may slide into a hole that
        # includes them (compaction handles the rest); then copy its keys to the new place.
        self.segments.discard(seg)
        self._give(seg.start, seg.capacity)
        self.held -= seg.capacity
        old = seg.start
        new = self._take(capacity, moving=seg)  # a compaction moves its keys itself (seg.start = new)
        if seg.start == old:
            self._copy(old, new, seg.length)
        seg.start, seg.capacity = new, capacity
        self.segments.add(seg)

    def write_prefix(self, seg: Segment, prefix: torch.Tensor) -> None:
        """prefix: [layers, 2, kv_heads, n, head_dim], written at the segment's start."""
        n = prefix.shape[3]
        self.kv[:, :, :, seg.start:seg.start + n] = prefix
        seg.length = n

    def fork(self, source: Segment, target: Segment) -> None:
        """Copy the keys and values `source` holds into the empty segment `target` (at least as large)."""
        assert target.length == 0 and target.capacity >= source.length, (source, target)
        self._copy(source.start, target.start, source.length)
        target.length = source.length

    def _take(self, size: int, moving: Segment | None = None) -> int:
        """The start of `size` slots taken first fit, compacting when no hole is large enough.
        moving: a segment being moved, already given back but whose keys are still in place."""
        if size > self.free_slots:
            raise MemoryError(f"the KV pool has {self.free_slots} free slots, {size} needed")
        i = _first_fit(self.free, size)
        if i is None:
            self._compact(moving)
            i = len(self.free) - 1  # everything free is now one interval at the end
        start = self.free[i][0]
        self._cut(i, size)
        self.held += size
        return start

    def _compact(self, moving: Segment | None) -> None:
        """Slide every segment down to the pool's start, in slot order, keeping its keys; the free
        slots become one interval at the end. `moving` (given back, its keys still in place) gets
        its keys put right after the others, and its `start` set there."""
        kept = self.kv[:, :, :, moving.start:moving.end].clone() if moving is not None and moving.length else None
        at = 0
        for seg in sorted(self.segments, key=lambda s: s.start):
            if seg.start != at:
                self._copy(seg.start, at, seg.length)
                seg.start = at
            at += seg.capacity
        if moving is not None:
            if kept is not None:
                self.kv[:, :, :, at:at + moving.length] = kept
            moving.start = at
        self.free = [[at, self.slots - at]] if at < self.slots else []
        self.compactions += 1

    def _copy(self, src: int, dst: int, n: int) -> None:
        if n and src != dst:
            block = self.kv[:, :, :, src:src + n]
            if abs(src - dst) < n:  # overlapping ranges: copy through a temporary
                block = block.clone()
            self.kv[:, :, :, dst:dst + n] = block

    def _cut(self, i: int, size: int) -> None:
        start, have = self.free[i]
        if have == size:
            del self.free[i]
        else:
            self.free[i] = [start + size, have - size]

    def _give(self, start: int, size: int) -> None:
        if size == 0:
            return
        i = bisect.bisect_left(self.free, [start, 0])
        self.free.insert(i, [start, size])
        if i + 1 < len(self.free) and start + size == self.free[i + 1][0]:  # merge with the next
            self.free[i][1] += self.free.pop(i + 1)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == start:  # and with the previous
            self.free[i - 1][1] += self.free.pop(i)[1]


def budget_bytes(setting: int | float | None, device) -> int:
    """The KV pool's bytes for `--kv-cache-memory` (parsed: bytes, a fraction, or None for auto):
    a fraction is of the memory free on the device now (after the model is loaded); auto is 0.9
    of it on an accelerator and `DEFAULT_KV_CACHE_BYTES` on CPU."""
    device = torch.device(device)
    if setting is None:
        if device.type == "cpu":
            return DEFAULT_KV_CACHE_BYTES
        setting = 0.9
    if isinstance(setting, int):
        return setting
    return int(setting * free_memory(device))


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:  # Linux; what the kernel thinks can be used without swapping
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _first_fit(free: list[list[int]], size: int) -> int | None:
    """The index of the first free interval that holds `size` slots."""
    return next((i for i, (_, have) in enumerate(free) if have >= size), None)


def most_slots(seq) -> int:
    """The most slots a request can ever need, alone: prefix, prompt and every token it may generate."""
    return seq.prefix_length + own_most_slots(seq)


def own_most_slots(seq) -> int:
    """The most slots its own segment can ever hold: prompt and every token it may generate."""
    return len(seq.prompt_ids) + seq.params.max_new_tokens


def first_capacity(seq) -> int:
    """A request's own segment when it is admitted (its prefix is shared, apart): prompt, the tokens
    it already generated (a preempted request computes them again) and room for the next ones."""
    held = len(seq.prompt_ids) + len(seq.output_ids)
    return held + min(own_most_slots(seq) - held, GROWTH_SLOTS)


def growth(seq, seg: Segment) -> int:
    """Slots a decoding request's segment needs added before this step: none while it has room."""
    if seg.length < seg.capacity:
        return 0
    return min(GROWTH_SLOTS, own_most_slots(seq) - seg.capacity) or 1


def prefix_key(seq) -> tuple | None:
    """The key of the shared prefix a request reads (None: no adapter, no prefix)."""
    return None if seq.adapter is None else seq.adapter.prefix_key


class Ledger:
    """The scheduler's count of free slots through one step, as the runner will find the pool: the
    step's releases given back, each shared prefix charged once, while some counted request holds it.
    A request counts with its siblings not yet forked (n, best_of): each holds a segment and the
    prefix from its admission. No tensors: it reads requests' sizes and segment capacities only."""

    def __init__(self, slots: int, running):
        """slots: the pool's; running: the requests keeping their KV through the step (segments held)."""
        self.holders: Counter = Counter()  # prefix key -> counted requests reading it
        self.free = slots
        for seq in running:
            for member in seq.group:
                self.free -= member.segment.capacity if member.segment is not None else first_capacity(member)
                self._hold(member)

    def admission(self, seq) -> int:
        """Slots admitting `seq` (and its siblings) takes: their first segments, and their prefix unless
        already held."""
        key = prefix_key(seq)
        prefix = seq.prefix_length if key is not None and not self.holders[key] else 0
        return sum(first_capacity(member) for member in seq.group) + prefix

    def admit(self, seq) -> None:
        for member in seq.group:
            self.free -= first_capacity(member)
            self._hold(member)

    def drop(self, seq) -> None:
        """A preempted request (and its siblings): segments back, and the prefix when no counted request
        reads it."""
        for member in seq.group:
            self.free += member.segment.capacity if member.segment is not None else first_capacity(member)
            key = prefix_key(member)
            if key is not None:
                self.holders[key] -= 1
                if not self.holders[key]:
                    del self.holders[key]
                    self.free += member.prefix_length

    def _hold(self, seq) -> None:
        key = prefix_key(seq)
        if key is not None:
            if not self.holders[key]:
                self.free -= seq.prefix_length
            self.holders[key] += 1
