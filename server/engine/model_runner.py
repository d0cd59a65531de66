"""Runs the frozen model over the running batch: decode steps and newcomers' prefills. No queues.

Rows of the batch are requests in `self.seqs` order; row i's keys/values live in row i of the
KVBatch. Each newcomer's adapter prefix is copied into its row before its prompt is prefilled,
so every adapter kind, and no adapter, share one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters import ModelSpec

from .kv_cache import KVBatch
from .request import Sequence
from .sampler import RowSampler, sample

PAD_WASTE = 0.1  # prefill newcomers in one forward while padding adds at most this share of tokens


@dataclass
class ScheduledStep:
    """What the scheduler asks the runner to do in one step."""

    release: list[Sequence] = field(default_factory=list)  # finished or aborted: free their rows first
    decode: bool = False  # every running row generates one token
    prefill: list[Sequence] = field(default_factory=list)  # newcomers: prefill, then their first token


@dataclass
class StepOutput:
    seq: Sequence  # the request this token belongs to
    token_id: int
    logprob: float  # log-probability of the token under the request's final distribution


class ModelRunner:
    def __init__(self, model, spec: ModelSpec, pad_token_id: int, max_rows: int):
        self.model = model
        self.spec = spec
        self.pad_token_id = pad_token_id
        self.max_rows = max_rows
        self.kv: KVBatch
        self.seqs: list[Sequence]  # row order
        self.samplers: list[RowSampler]  # row order
        self.reset()

    def reset(self) -> None:
        """Drop every row (after a failed step)."""
        self.kv = KVBatch(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, self.spec.device,
                          self.spec.dtype, self.max_rows)
        self.seqs, self.samplers = [], []

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[StepOutput]:
        if step.release:
            self._release(step.release)
        outputs = self._decode() if step.decode and self.seqs else []
        if step.prefill:
            self._reserve_for(step.prefill)
        for group in _groups_by_length(step.prefill):
            outputs += self._prefill(group)
        return outputs

    def _release(self, seqs: list[Sequence]) -> None:
        gone = {s.id for s in seqs}
        rows = [i for i, s in enumerate(self.seqs) if s.id in gone]
        for src, dst in self.kv.close_rows(rows):
            self.seqs[dst], self.samplers[dst] = self.seqs[src], self.samplers[src]
        del self.seqs[self.kv.rows:], self.samplers[self.kv.rows:]

    def _reserve_for(self, newcomers: list[Sequence]) -> None:
        """One reallocation at most per step: room for every newcomer and for the batch's generation."""
        before = max(s.prefix_length for s in newcomers) + max(len(s.prompt_ids) for s in newcomers)
        after = max(s.params.max_new_tokens - len(s.output_ids) for s in self.seqs + newcomers)
        self.kv.reserve(self.kv.rows + len(newcomers), before, after)

    def _decode(self) -> list[StepOutput]:
        mask, cache = self.kv.decode_inputs()
        rows = len(self.seqs)
        input_ids = torch.tensor([[s.output_ids[-1]] for s in self.seqs], device=self.spec.device)  # [rows, 1]
        positions = self.kv.positions[:rows, None]  # [rows, 1]
        logits = self._forward(input_ids, mask, positions, cache)  # [rows, vocab]
        self.kv.advance()
        return self._sample(self.seqs, self.samplers, logits)

    def _prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        longest = max(len(s.prompt_ids) for s in seqs)
        rows = self.kv.open_rows([s.adapter.kv if s.adapter else None for s in seqs], longest)
        input_ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)  # [new, longest]
        real = torch.zeros(len(seqs), longest, dtype=torch.long)  # 1 = prompt token, 0 = left padding
        positions = torch.zeros(len(seqs), longest, dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s.prompt_ids)
            input_ids[i, longest - n:] = torch.tensor(s.prompt_ids)
            real[i, longest - n:] = 1
            positions[i, longest - n:] = torch.arange(s.prefix_length, s.prefix_length + n)
        device = self.spec.device
        mask, cache = self.kv.prefill_inputs(rows, real.to(device))
        logits = self._forward(input_ids.to(device), mask, positions.to(device), cache)
        self.kv.positions[rows] += real.sum(dim=1).to(device)
        samplers = [RowSampler(s.params, s.seed, device) for s in seqs]
        self.seqs += seqs
        self.samplers += samplers
        return self._sample(seqs, samplers, logits)

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]  # [rows, vocab]

    @staticmethod
    def _sample(seqs: list[Sequence], samplers: list[RowSampler], logits: torch.Tensor) -> list[StepOutput]:
        needs_history = any(s.params.repetition_penalty not in (None, 1.0) for s in seqs)
        history = [s.prompt_ids + s.output_ids for s in seqs] if needs_history else [[]] * len(seqs)
        tokens, logprobs = sample(logits, samplers, history)
        return [StepOutput(s, t, lp) for s, t, lp in zip(seqs, tokens, logprobs)]


def _groups_by_length(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Split newcomers into prefill forwards of similar prompt length, so padding stays small."""
    if not seqs:
        return []
    ordered = sorted(seqs, key=lambda s: len(s.prompt_ids))
    groups, group = [], [ordered[0]]
    for s in ordered[1:]:
        tokens = sum(len(x.prompt_ids) for x in group) + len(s.prompt_ids)
        padded = len(s.prompt_ids) * (len(group) + 1)
        if padded - tokens > PAD_WASTE * padded:
            groups.append(group)
            group = []
        group.append(s)
    groups.append(group)
    return groups
