"""Choosing every row's next token with its own parameters, in a few batched calls per step.

A step's rows are one `[rows, vocab]` tensor, and each parameter one `[rows]` tensor for the step:
1. processors, on every row, greedy ones too, in transformers' order: repetition penalty (CTRL,
   over prompt + output), frequency and presence penalties (OpenAI, over the output), logit
   bias, and the end tokens masked while the output is shorter than `min_tokens`;
2. greedy rows take the argmax of that: exactly the argmax of the processed logits;
3. sampled rows are warped, in transformers' order (temperature, top-k, top-p, min-p,
   typical-p; a removed token's logit becomes -inf), then draw: each row takes one uniform number
   from its own generator, so a seeded request draws the same tokens whatever else is in the
   batch, and all rows pick their token at once by inverse CDF (one cumsum, one searchsorted).

Log-probabilities, the chosen token's and (only when asked) the top alternatives', are
`log_softmax` of the distribution the token was drawn from, as TGI reports them: after the
processors for a greedy row, after the processors and warpers for a sampled one (a token a warper
removed is left out of the alternatives). vLLM reports the raw model's by default instead.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

from .request import SamplingParams


class RowSampler:
    """A row's sampling state: its parameters and, when sampling, its own random generator."""

    def __init__(self, params: SamplingParams, seed: int, device: torch.device, end_ids: frozenset[int] = frozenset()):
        """end_ids: the model's end-of-sequence tokens; with `stop_token_ids` (and unless
        `ignore_eos`), what `min_tokens` masks."""
        self.params = params
        self.seed = seed
        self.generator = None
        if params.sampling:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(end_ids))
        self.min_tokens_masked = sorted(ends) if params.min_tokens else []

    @property
    def needs_history(self) -> bool:
        """Whether it reads the request's tokens (penalties, min_tokens)."""
        p = self.params
        return (p.repetition_penalty not in (None, 1.0) or bool(p.frequency_penalty) or bool(p.presence_penalty)
                or bool(self.min_tokens_masked))


class Sampled(NamedTuple):
    tokens: list[int]  # per row, the chosen id
    logprobs: list[float]  # per row, its log-probability under the distribution it was drawn from
    top: list[tuple[tuple[int, float], ...] | None]  # per row, the most likely (id, logprob), best first; None unless asked


def sample(logits: torch.Tensor, rows: list[RowSampler], history: list[list[int]] | None = None,
           outputs: list[list[int]] | None = None) -> Sampled:
    """logits: [rows, vocab]. history: per row, prompt + generated ids (repetition penalty); outputs:
    per row, the generated ids alone (frequency and presence penalties, min_tokens). Both only
    needed when a row's `needs_history`."""
    logits = _process(logits.float(), rows, history, outputs)  # [rows, vocab]
    tokens = logits.argmax(dim=-1)  # [rows]
    drawing = [i for i, r in enumerate(rows) if r.generator is not None]
    if drawing:
        at = torch.tensor(drawing, device=logits.device)
        warped = _warp(logits[at], [rows[i].params for i in drawing])  # [drawing, vocab]
        tokens[at] = _draw(warped, [rows[i].generator for i in drawing])
        logits = logits.index_copy(0, at, warped)
    logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    top: list = [None] * len(rows)
    asking = [i for i, r in enumerate(rows) if r.params.top_logprobs]
    if asking:
        at = torch.tensor(asking, device=logits.device)
        k = min(max(rows[i].params.top_logprobs for i in asking), logits.shape[1])
        values, ids = logprobs[at].topk(k, dim=-1)  # [asking, k]
        for i, vs, ts in zip(asking, values.tolist(), ids.tolist()):
            n = rows[i].params.top_logprobs
            top[i] = tuple((t, v) for t, v in zip(ts[:n], vs[:n]) if v != float("-inf"))
    return Sampled(tokens.tolist(), chosen.tolist(), top)


def _process(logits: torch.Tensor, rows: list[RowSampler], history, outputs) -> torch.Tensor:
    """The processors on every row that has them, each one sparse over the (row, token) pairs it
    touches; the caller's logits are left as they are. logits: [rows, vocab]."""
    params = [r.params for r in rows]
    repeat = [i for i, p in enumerate(params) if p.repetition_penalty not in (None, 1.0)]
    counted = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    masked = [i for i, r in enumerate(rows) if r.min_tokens_masked and len(outputs[i]) < r.params.min_tokens]
    if not (repeat or counted or biased or masked):
        return logits
    logits = logits.clone()
    device = logits.device
    if repeat:  # CTRL's: positive logits divided, negative ones multiplied, once per distinct token seen
        seen = [sorted(set(history[i])) for i in repeat]
        at, ids = _pairs(repeat, seen, device)
        penalty = _per_pair([params[i].repetition_penalty for i in repeat], seen, device)
        values = logits[at, ids]
        logits[at, ids] = torch.where(values > 0, values / penalty, values * penalty)
    if counted:  # OpenAI's: logit - count * frequency_penalty - (count > 0) * presence_penalty
        counts = [Counter(outputs[i]) for i in counted]
        at, ids = _pairs(counted, [list(c) for c in counts], device)
        n = torch.tensor([v for c in counts for v in c.values()], dtype=logits.dtype, device=device)
        frequency = _per_pair([params[i].frequency_penalty for i in counted], counts, device)
        presence = _per_pair([params[i].presence_penalty for i in counted], counts, device)
        logits.index_put_((at, ids), -(n * frequency + presence), accumulate=True)
    if biased:
        biases = [params[i].logit_bias for i in biased]
        at, ids = _pairs(biased, [[t for t, _ in b] for b in biases], device)
        bias = torch.tensor([v for b in biases for _, v in b], dtype=logits.dtype, device=device)
        logits.index_put_((at, ids), bias, accumulate=True)
    if masked:
        at, ids = _pairs(masked, [rows[i].min_tokens_masked for i in masked], device)
        logits[at, ids] = float("-inf")
    return logits


def _pairs(rows: list[int], ids: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, token) index pairs of `ids[j]` on row `rows[j]`: two [pairs] tensors."""
    at = [r for r, row_ids in zip(rows, ids) for _ in row_ids]
    flat = [t for row_ids in ids for t in row_ids]
    return torch.tensor(at, dtype=torch.long, device=device), torch.tensor(flat, dtype=torch.long, device=device)


def _per_pair(values: list[float], ids: list, device) -> torch.Tensor:
    """values[j] repeated for each of `ids[j]`: [pairs]."""
    return torch.tensor([v for v, row_ids in zip(values, ids) for _ in row_ids], device=device)


def _warp(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p and typical-p, each row its own (transformers' warpers, in
    their order); removed tokens get -inf. logits: [rows, vocab] -> [rows, vocab]."""
    device, vocab = logits.device, logits.shape[1]
    ninf = float("-inf")
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    ks = [min(p.top_k, vocab) if p.top_k else 0 for p in params]
    if any(0 < k < vocab for k in ks):
        k = torch.tensor(ks, device=device)  # [rows]
        kth = logits.topk(max(ks), dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])  # [rows, 1]
        kth = torch.where(k[:, None] > 0, kth, ninf)
        logits = logits.masked_fill(logits < kth, ninf)
    if any(p.top_p is not None and p.top_p < 1.0 for p in params):
        top_p = torch.tensor([1.0 if p.top_p is None else p.top_p for p in params], device=device)[:, None]
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        remove = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0)  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(1, order, remove), ninf)
    if any(p.min_p for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), ninf)
    if any(p.typical_p is not None and p.typical_p < 1.0 for p in params):
        logits = _typical(logits, torch.tensor([1.0 if p.typical_p is None else p.typical_p for p in params],
                                               device=device))
    return logits


def _typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (transformers' TypicalLogitsWarper, a mass per row): keep the tokens
    whose surprise is closest to the entropy, until they hold `mass`. logits: [rows, vocab]; mass: [rows]."""
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)  # [rows, 1]
    distance, order = (-logp - entropy).abs().sort(dim=-1)
    cumulative = logits.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=1).clamp(max=logits.shape[1] - 1)
    remove = distance > distance.gather(1, last[:, None])
    remove[:, 0] = False
    remove &= (mass < 1.0)[:, None]
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def _draw(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits), by inverse CDF: a uniform number per row, each from
    its row's own generator. logits: [rows, vocab] -> [rows]."""
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    cdf = probs.cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])  # [rows]
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # never a zero-probability token...
    last = probs.shape[1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)  # ...but past the end when rounding says so
    return torch.minimum(picked, last)
