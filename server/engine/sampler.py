"""Choosing each row's next token with its own parameters: greedy, temperature, top-k, top-p,
repetition penalty, and a per-request random generator so that a seeded request draws the same
tokens whatever else is in the batch."""

from __future__ import annotations

import torch

from .request import SamplingParams


class RowSampler:
    """A row's sampling state: its parameters and, when sampling, its own random generator."""

    def __init__(self, params: SamplingParams, seed: int, device: torch.device):
        self.params = params
        self.seed = seed
        self.generator = None
        if params.sampling:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)


def sample(
    logits: torch.Tensor, rows: list[RowSampler], history: list[list[int]]
) -> tuple[list[int], list[float]]:
    """logits: [rows, vocab] (float). history: per row, prompt + generated ids (for the penalty).

    Returns the chosen token ids and their log-probabilities under the row's final distribution.
    """
    logits = logits.float()
    penalized = [i for i, r in enumerate(rows) if r.params.repetition_penalty not in (None, 1.0)]
    if penalized:
        logits = logits.clone()
        for i in penalized:
            _apply_repetition_penalty(logits[i], history[i], rows[i].params.repetition_penalty)

    tokens = logits.argmax(dim=-1)  # [rows]
    logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab]
    sampled = [i for i, r in enumerate(rows) if r.generator is not None]
    if sampled:
        for i in sampled:
            row_logprobs = _warp(logits[i], rows[i].params)
            probs = row_logprobs.exp()
            tokens[i] = torch.multinomial(probs, 1, generator=rows[i].generator)[0]
            logprobs[i] = row_logprobs
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()


def _apply_repetition_penalty(row: torch.Tensor, history: list[int], penalty: float) -> None:
    """CTRL's penalty (as in transformers and TGI): divide positive logits, multiply negative ones."""
    seen = torch.tensor(sorted(set(history)), device=row.device, dtype=torch.long)
    if seen.numel():
        values = row[seen]
        row[seen] = torch.where(values > 0, values / penalty, values * penalty)


def _warp(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities after temperature, top-k and top-p; removed tokens get -inf. row: [vocab]."""
    row = row / params.temperature
    if params.top_k:
        k = min(params.top_k, row.numel())
        kth = torch.topk(row, k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first token always
        row = row.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return torch.log_softmax(row, dim=-1)
