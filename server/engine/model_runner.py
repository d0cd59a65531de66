"""Runs the frozen model over the running requests: one packed forward per step. No queues.

A step's forward holds, back to back, one token for every running request and the whole prompt
of every newcomer (`attention.py`). A newcomer's adapter prefix is copied into its pool segment
before its prompt, so every adapter kind, and no adapter, share one forward: the prefix sits at
positions 0..n-1 directly before the request's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters import ModelSpec

from . import attention, cpu_attention
from .kv_cache import GROWTH_SLOTS, KVPool, Segment
from .request import Sequence
from .sampler import RowSampler, sample


@dataclass
class ScheduledStep:
    """What the scheduler asks the runner to do in one step."""

    release: list[Sequence] = field(default_factory=list)  # finished or aborted: free their KV segments first
    decode: bool = False  # every running request generates one token
    prefill: list[Sequence] = field(default_factory=list)  # newcomers: prefill, then their first token


@dataclass
class StepOutput:
    seq: Sequence  # the request this token belongs to
    token_id: int
    logprob: float  # log-probability of the token under the request's final distribution


@dataclass
class _Row:
    seq: Sequence
    sampler: RowSampler
    segment: Segment  # its keys/values: prefix, prompt, fed-back tokens; slot i holds position i


class ModelRunner:
    def __init__(self, model, spec: ModelSpec):
        self.model = model
        self.spec = spec
        attention.install(model)
        if spec.device.type == "cpu":
            cpu_attention.available()  # build or load the decode kernel now, not in the first request
        self.pool: KVPool
        self.rows: list[_Row]
        self.reset()

    def reset(self) -> None:
        """Drop every request (after a failed step)."""
        self.pool = KVPool(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, self.spec.device,
                           self.spec.dtype)
        self.rows = []

    @property
    def seqs(self) -> list[Sequence]:
        return [row.seq for row in self.rows]

    def run(self, step: ScheduledStep) -> list[StepOutput]:
        """One step. If it raises (the forward, or sampling), the runner is left as it was before
        the step, released requests aside: the running rows keep their lengths, newcomers are gone."""
        if step.release:
            self._release(step.release)
        before = [(row, row.segment.length) for row in self.rows]
        try:
            batch, logits = self.forward(step)
            return self._sample(batch, logits) if batch else []
        except BaseException:
            kept = {id(row) for row, _ in before}
            for row in self.rows:
                if id(row) not in kept:
                    self.pool.release(row.segment)
            self.rows = [row for row, _ in before]
            for row, length in before:
                row.segment.length = length
            raise

    @torch.inference_mode()
    def forward(self, step: ScheduledStep) -> tuple[list[_Row], torch.Tensor | None]:
        """Release, grow, admit, then one packed forward: the rows in packing order and each one's
        last logits [rows, vocab] (no rows, None: nothing to run)."""
        if step.release:
            self._release(step.release)
        rows = self.rows if step.decode else []
        for row in rows:  # room for the token each running request feeds back
            seg = row.segment
            if seg.length == seg.capacity:
                self.pool.extend(seg, seg.capacity + GROWTH_SLOTS)
        if step.prefill:
            self.pool.reserve([_first_capacity(seq) for seq in step.prefill])
        new_rows = [self._admit(seq) for seq in step.prefill]
        self.rows = self.rows + new_rows  # a new list: `run` restores the old one if the step fails
        if not rows and not new_rows:
            return [], None
        tokens = [[row.seq.output_ids[-1]] for row in rows] + [row.seq.prompt_ids for row in new_rows]
        batch = rows + new_rows
        return batch, self._forward(batch, tokens)

    def _release(self, seqs: list[Sequence]) -> None:
        gone = {s.id for s in seqs}
        for row in self.rows:
            if row.seq.id in gone:
                self.pool.release(row.segment)
        self.rows = [row for row in self.rows if row.seq.id not in gone]

    def _admit(self, seq: Sequence) -> _Row:
        """A segment for the newcomer, its adapter's prefix written at the start."""
        segment = self.pool.allocate(_first_capacity(seq))
        if seq.adapter is not None:
            self.pool.write_prefix(segment, seq.adapter.kv)
        return _Row(seq, RowSampler(seq.params, seq.seed, self.spec.device), segment)

    def _forward(self, batch: list[_Row], tokens: list[list[int]]) -> torch.Tensor:
        """tokens: per row, the ids it adds in this forward. Returns each row's last logits [rows, vocab]."""
        q_lens = [len(t) for t in tokens]
        kv_lens = [row.segment.length + n for row, n in zip(batch, q_lens)]
        positions = [p for row, n in zip(batch, kv_lens) for p in range(row.segment.length, n)]
        ragged = attention.RaggedStep.build(self.pool, [row.segment.start for row in batch], q_lens, kv_lens)
        device = self.spec.device
        last = torch.tensor(q_lens, device=device).cumsum(0) - 1  # [rows] each row's last token
        out = self.model(
            input_ids=torch.tensor([[t for ids in tokens for t in ids]], device=device),  # [1, tokens]
            position_ids=torch.tensor([positions], device=device),  # [1, tokens]
            attention_mask=attention.NO_MASK,
            ragged=ragged,
            use_cache=False,
            logits_to_keep=last,
        )
        for row, n in zip(batch, kv_lens):
            row.segment.length = n
        return out.logits[0]  # [rows, vocab]

    @staticmethod
    def _sample(batch: list[_Row], logits: torch.Tensor) -> list[StepOutput]:
        seqs = [row.seq for row in batch]
        needs_history = any(s.params.repetition_penalty not in (None, 1.0) for s in seqs)
        history = [s.prompt_ids + s.output_ids for s in seqs] if needs_history else [[]] * len(seqs)
        tokens, logprobs = sample(logits, [row.sampler for row in batch], history)
        return [StepOutput(s, t, lp) for s, t, lp in zip(seqs, tokens, logprobs)]


def _first_capacity(seq: Sequence) -> int:
    """A newcomer's first segment: prefix, prompt and the first tokens it will feed back."""
    return seq.prefix_length + len(seq.prompt_ids) + min(seq.params.max_new_tokens, GROWTH_SLOTS)
