"""The running batch's key/value memory: one dense buffer that rows join and leave between steps.

Layout: `kv[layer, k|v, row, kv_head, slot, head_dim]`. All active rows share a window of slots
`[start, end)` and every row's last token sits at `end - 1`, so a decode step writes each row's
new key/value at slot `end`. Within a row: padding, the adapter's prefix, then the prompt and
generated tokens. Padding is masked and positions are explicit, so each row's prefix sits
directly before its own tokens (positions 0..n-1, then n, n+1, ...) whatever the padding.

Newcomers are prefilled straight into free rows, right-aligned so that their prompts end at
`end` too: running rows are not copied when others join. The buffer is reallocated (and copied)
only when it runs out of rows, of slots on the right (generation) or on the left (a newcomer
longer than the window). Leaving rows are filled by moving the last rows into their place, and
the window's left edge moves right past columns that no active row uses.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROWTH_SLOTS = 64  # slots added on the right at least, when a reallocation happens anyway


class KVBatch:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device, dtype, max_rows: int):
        self.dims = (num_layers, num_kv_heads, head_dim)
        self.max_rows = max_rows  # the buffer never holds more rows (the scheduler's batch limit)
        self.device, self.dtype = torch.device(device), dtype
        self.rows = 0  # active rows are 0..rows-1
        self.start = self.end = 0  # the window of slots the active rows use
        self.kv = self._zeros(0, 0)  # [layers, 2, rows_cap, kv_heads, slots_cap, head_dim]
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [rows_cap, slots_cap]; 1 = real
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [rows_cap]: next position id

    def _zeros(self, rows: int, slots: int) -> torch.Tensor:
        layers, heads, head_dim = self.dims
        return torch.zeros(layers, 2, rows, heads, slots, head_dim, device=self.device, dtype=self.dtype)

    @property
    def length(self) -> int:
        return self.end - self.start

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def reserve(self, rows: int, before_end: int, after_end: int) -> None:
        """Room for `rows` active rows, `before_end` slots before `end` and `after_end` from it on."""
        rows_cap, slots_cap = self.kv.shape[2], self.kv.shape[4]
        if self.rows == 0 and before_end + after_end <= slots_cap:
            self.start = self.end = before_end  # empty: place the window freely
        if rows <= rows_cap and self.end >= before_end and self.end + after_end <= slots_cap:
            return
        new_rows = rows_cap if rows <= rows_cap else max(rows, min(2 * rows_cap, self.max_rows))
        new_end = max(self.length, before_end)  # the window moves back to the left: nothing is kept before it
        new_start = new_end - self.length
        kv = self._zeros(new_rows, new_end + max(after_end, GROWTH_SLOTS))
        mask = torch.zeros(kv.shape[2], kv.shape[4], dtype=torch.long, device=self.device)
        positions = torch.zeros(kv.shape[2], dtype=torch.long, device=self.device)
        n = self.rows
        kv[:, :, :n, :, new_start:new_end] = self.kv[:, :, :n, :, self.start:self.end]
        mask[:n, new_start:new_end] = self.mask[:n, self.start:self.end]
        positions[:n] = self.positions[:n]
        self.kv, self.mask, self.positions = kv, mask, positions
        self.start, self.end = new_start, new_end

    def open_rows(self, prefixes: list[torch.Tensor | None], prompt_len: int) -> slice:
        """Add rows for newcomers whose left-padded prompts, `prompt_len` slots, will end at `end`.

        prefixes: per new row, its adapter's [layers, 2, kv_heads, n, head_dim], or None. Each is
        written right before the prompt slots, and the row's next position is its length n.
        """
        longest = max((p.shape[3] for p in prefixes if p is not None), default=0)
        self.reserve(self.rows + len(prefixes), longest + prompt_len, 1)
        prompt_start = self.end - prompt_len
        first = self.rows
        for row, prefix in enumerate(prefixes, start=first):
            n = 0 if prefix is None else prefix.shape[3]
            self.mask[row].zero_()
            if n:
                self.kv[:, :, row, :, prompt_start - n:prompt_start] = prefix
                self.mask[row, prompt_start - n:prompt_start] = 1
            self.positions[row] = n
        self.start = prompt_start - longest if first == 0 else min(self.start, prompt_start - longest)
        self.rows += len(prefixes)
        return slice(first, self.rows)

    def close_rows(self, rows: list[int]) -> list[tuple[int, int]]:
        """Free `rows`; the last active rows move into the holes. Returns the (from, to) moves made."""
        moves = []
        for row in sorted(rows, reverse=True):
            last = self.rows - 1
            if row != last:
                self.kv[:, :, row] = self.kv[:, :, last]
                self.mask[row] = self.mask[last]
                self.positions[row] = self.positions[last]
                moves.append((last, row))
            self.mask[last].zero_()
            self.rows -= 1
        if self.rows == 0:
            self.start = self.end
        else:  # move the left edge past columns no active row uses any more
            used = self.mask[: self.rows, self.start:self.end].any(dim=0)
            self.start += int(used.int().argmax())
        return moves

    def prefill_inputs(self, rows: slice, real: torch.Tensor):
        """Mask and cache for prefilling newcomers' prompts (real: [rows, prompt_len], 1 = token, 0 = pad)."""
        write_at = self.end - real.shape[1]
        self.mask[rows, write_at:self.end] = real
        return self.mask[rows, self.start:self.end], _BufferCache(self, rows, write_at)

    def decode_inputs(self):
        """Mask and cache for one new token on every active row; call `advance()` after the forward."""
        self.reserve(self.rows, 0, 1)
        rows = slice(0, self.rows)
        self.mask[rows, self.end] = 1
        return self.mask[rows, self.start:self.end + 1], _BufferCache(self, rows, self.end)

    def advance(self) -> None:
        self.end += 1
        self.positions[: self.rows] += 1


class _BufferLayer(CacheLayerMixin):
    """A transformers cache layer writing at slot `write_at` of one layer of a KVBatch."""

    is_sliding = False

    def __init__(self, batch: KVBatch, layer: int, rows: slice, write_at: int):
        super().__init__()
        self.batch, self.layer, self.rows, self.write_at = batch, layer, rows, write_at
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states, value_states: [rows, kv_heads, new_tokens, head_dim]
        kv = self.batch.kv[self.layer]
        stop = self.write_at + key_states.shape[-2]
        kv[0, self.rows, :, self.write_at:stop] = key_states
        kv[1, self.rows, :, self.write_at:stop] = value_states
        return kv[0, self.rows, :, self.batch.start:stop], kv[1, self.rows, :, self.batch.start:stop]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.write_at - self.batch.start

    def get_max_length(self) -> int:
        return -1


class _BufferCache(Cache):
    def __init__(self, batch: KVBatch, rows: slice, write_at: int):
        super().__init__(layers=[_BufferLayer(batch, i, rows, write_at) for i in range(batch.dims[0])])
