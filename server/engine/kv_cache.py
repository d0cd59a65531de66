"""The running requests' key/value memory: one pool of token slots, a contiguous segment per request.

Layout: `kv[layer, k|v, kv_head, slot, head_dim]`. A request's segment holds its adapter's prefix,
then its prompt, then the tokens it feeds back, in position order with no padding: a request holds
prefix + prompt + generated slots, plus at most `GROWTH_SLOTS - 1` not yet written. Segments grow
in place when the slots after them are free, else move; they return to the pool when the request
ends, and the pool's memory is released when no request holds any.

The pool grows by reallocating (offsets stay valid); free space is kept as a sorted list of
coalesced intervals and handed out first-fit.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

GROWTH_SLOTS = 32  # a segment is extended by this many slots when it runs out
POOL_ROUND = 256  # the pool's size is a multiple of this many slots


@dataclass
class Segment:
    """One request's slots: `[start, start + capacity)`, of which the first `length` are written."""

    start: int
    capacity: int
    length: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device, dtype):
        self.dims = (num_layers, num_kv_heads, head_dim)
        self.device, self.dtype = torch.device(device), dtype
        self.kv = self._zeros(0)  # [layers, 2, kv_heads, slots, head_dim]
        self.free: list[list[int]] = []  # sorted, coalesced [start, size] intervals
        self.held = 0  # slots held by segments

    def _zeros(self, slots: int) -> torch.Tensor:
        layers, heads, head_dim = self.dims
        return torch.zeros(layers, 2, heads, slots, head_dim, device=self.device, dtype=self.dtype)

    @property
    def slots(self) -> int:
        return self.kv.shape[3]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def allocate(self, capacity: int) -> Segment:
        i = _first_fit(self.free, capacity)
        if i is None:
            self.reserve([capacity])
            i = _first_fit(self.free, capacity)
        start = self.free[i][0]
        self._take(i, capacity)
        return Segment(start, capacity)

    def reserve(self, capacities: list[int]) -> None:
        """Grow once, if needed, so that segments of these capacities can all be allocated, in order."""
        free = [list(interval) for interval in self.free]
        missing = 0
        for capacity in capacities:  # the same first fit as `allocate`, on a copy
            i = _first_fit(free, capacity)
            if i is None:
                missing += capacity
            else:
                free[i][0] += capacity
                free[i][1] -= capacity
        if missing:
            tail = free[-1][1] if free and sum(free[-1]) == self.slots else 0
            self._grow(missing - tail)

    def release(self, seg: Segment) -> None:
        self._put_back(seg.start, seg.capacity)
        seg.capacity = seg.length = 0
        if self.held == 0:  # nothing running: hand the memory back
            self.kv, self.free = self._zeros(0), []

    def extend(self, seg: Segment, capacity: int) -> None:
        """Make `seg` hold `capacity` slots: in place if the slots after it are free (growing the pool
        when it ends the pool), else by moving it."""
        extra = capacity - seg.capacity
        if extra <= 0:
            return
        after = seg.start + seg.capacity
        i = bisect.bisect_left(self.free, [after, 0])
        room = self.free[i][1] if i < len(self.free) and self.free[i][0] == after else 0
        if room < extra and after + room == self.slots:  # the pool's last segment: grow the pool
            self._grow(extra - room)
            room = self.free[i][1]
        if room >= extra:
            self._take(i, extra)
            seg.capacity = capacity
            return
        moved = self.allocate(capacity)  # may grow the pool: offsets stay valid
        self.kv[:, :, :, moved.start:moved.start + seg.length] = self.kv[:, :, :, seg.start:seg.end]
        self._put_back(seg.start, seg.capacity)
        seg.start, seg.capacity = moved.start, capacity

    def write_prefix(self, seg: Segment, prefix: torch.Tensor) -> None:
        """prefix: [layers, 2, kv_heads, n, head_dim], written at the segment's start."""
        n = prefix.shape[3]
        self.kv[:, :, :, seg.start:seg.start + n] = prefix
        seg.length = n

    def _take(self, i: int, size: int) -> None:
        start, have = self.free[i]
        if have == size:
            del self.free[i]
        else:
            self.free[i] = [start + size, have - size]
        self.held += size

    def _put_back(self, start: int, size: int) -> None:
        """A segment's slots become free again."""
        self._give(start, size)
        self.held -= size

    def _give(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self.free, [start, 0])
        self.free.insert(i, [start, size])
        if i + 1 < len(self.free) and start + size == self.free[i + 1][0]:  # merge with the next
            self.free[i][1] += self.free.pop(i + 1)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == start:  # and with the previous
            self.free[i - 1][1] += self.free.pop(i)[1]

    def _grow(self, at_least: int) -> None:
        old = self.slots
        new = max(old + at_least, old * 3 // 2)
        new = -(-new // POOL_ROUND) * POOL_ROUND
        kv = self._zeros(new)
        kv[:, :, :, :old] = self.kv
        self.kv = kv
        self._give(old, new - old)


def _first_fit(free: list[list[int]], size: int) -> int | None:
    """The index of the first free interval that holds `size` slots."""
    return next((i for i, (_, have) in enumerate(free) if have >= size), None)
