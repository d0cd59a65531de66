"""The batched sampler (server/engine/sampler.py): a batch equals its rows sampled one at a time,
seeded rows draw the same whatever the batch, each processor and warper gives transformers'
distribution for the same inputs, and the reported log-probabilities are that distribution's."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from server.engine import sampler
from server.engine.request import InvalidRequest, SamplingParams
from server.engine.sampler import RowSampler, sample

CPU = torch.device("cpu")
VOCAB = 20  # no more than MAX_TOP_LOGPROBS: top_logprobs=20 shows a row's whole distribution
EOS = 2


def _logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def _history(rows: int, seed: int = 0, vocab: int = VOCAB) -> tuple[list[list[int]], list[list[int]]]:
    """Per row: prompt + output ids, and the output alone."""
    g = torch.Generator().manual_seed(seed + 100)
    prompts = [torch.randint(vocab, (5,), generator=g).tolist() for _ in range(rows)]
    outputs = [torch.randint(vocab, (1 + i % 6,), generator=g).tolist() for i in range(rows)]
    return [p + o for p, o in zip(prompts, outputs)], outputs


MIXED = [
    SamplingParams(),
    SamplingParams(do_sample=True, temperature=0.7, top_k=5, seed=1),
    SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=-0.3, top_logprobs=3),
    SamplingParams(do_sample=True, top_p=0.8, min_p=0.05, seed=2, top_logprobs=5),
    SamplingParams(do_sample=True, typical_p=0.6, logit_bias=((3, 5.0), (4, -100.0)), seed=3),
    SamplingParams(do_sample=True, temperature=1.3, top_k=12, top_p=0.9, typical_p=0.95, min_p=0.1,
                   repetition_penalty=0.8, seed=4, top_logprobs=20),
    SamplingParams(max_new_tokens=30, min_tokens=20, stop_token_ids=(7,), logit_bias=((EOS, 100.0),), top_logprobs=1),
    SamplingParams(do_sample=True, temperature=0),  # greedy
]


def _rows(params: list[SamplingParams]) -> list[RowSampler]:
    return [RowSampler(p, 1000 + i, CPU, frozenset({EOS})) for i, p in enumerate(params)]


def test_a_batch_equals_its_rows_alone():
    logits = _logits(len(MIXED), 1)
    history, outputs = _history(len(MIXED), 1)
    batch = _rows(MIXED)
    alone = _rows(MIXED)
    for step in range(5):
        got = sample(logits, batch, history, outputs)
        for i, row in enumerate(alone):
            one = sample(logits[i:i + 1], [row], history[i:i + 1], outputs[i:i + 1])
            assert got.tokens[i] == one.tokens[0], (step, i)
            assert got.logprobs[i] == pytest.approx(one.logprobs[0], abs=1e-5)
            assert (got.top[i] is None) == (one.top[0] is None)
            if got.top[i] is not None:
                assert [t for t, _ in got.top[i]] == [t for t, _ in one.top[0]]
                assert [v for _, v in got.top[i]] == pytest.approx([v for _, v in one.top[0]], abs=1e-5)


def test_seeded_rows_draw_the_same_whatever_the_batch():
    params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=5)
    logits = _logits(6, 2)
    alone = RowSampler(params, 5, CPU)
    expected = [sample(logits[3:4], [alone]).tokens[0] for _ in range(30)]
    others = [RowSampler(SamplingParams(do_sample=True, min_p=0.2), 9, CPU), RowSampler(SamplingParams(), 0, CPU),
              RowSampler(SamplingParams(do_sample=True, top_k=3), 11, CPU)]
    mine = RowSampler(params, 5, CPU)
    got = []
    for step in range(30):  # the batch around it changes every step
        rows = others[: step % 4] + [mine] + others[step % 4:]
        at = rows.index(mine)
        order = [0, 1, 2, 4, 5][: at] + [3] + [0, 1, 2, 4, 5][at:len(rows) - 1]
        got.append(sample(logits[order], rows).tokens[at])
    assert got == expected
    assert len(set(expected)) > 1


def test_greedy_rows_are_the_argmax_of_the_processed_logits():
    logits = _logits(4, 3)
    history, outputs = _history(4, 3)
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=1.0, logit_bias=((1, 2.0),))
    got = sample(logits, _rows([params] * 4), history, outputs)
    expected = sampler._process(logits, _rows([params] * 4), history, outputs).argmax(dim=-1)
    assert got.tokens == expected.tolist()
    plain = sample(logits, _rows([SamplingParams()] * 4))
    assert plain.tokens == logits.argmax(dim=-1).tolist()
    assert plain.top == [None] * 4  # nothing beyond the chosen token unless asked


# --- each processor and warper against transformers' ------------------------------------------


def _reference_warped(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers, in the order `generate` applies them."""
    out = logits.clone()
    if p.temperature != 1.0:
        out = TemperatureLogitsWarper(p.temperature)(None, out)
    if p.top_k:
        out = TopKLogitsWarper(p.top_k)(None, out)
    if p.top_p is not None and p.top_p < 1.0:
        out = TopPLogitsWarper(p.top_p)(None, out)
    if p.min_p:
        out = MinPLogitsWarper(p.min_p)(None, out)
    if p.typical_p is not None and p.typical_p < 1.0:
        out = TypicalLogitsWarper(p.typical_p)(None, out)
    return out


WARPED = [
    dict(temperature=0.6), dict(top_k=4), dict(top_k=1), dict(top_p=0.7), dict(top_p=0.05), dict(min_p=0.1),
    dict(min_p=1.0), dict(typical_p=0.5), dict(typical_p=0.95), dict(typical_p=0.2, temperature=1.5),
    dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.02, typical_p=0.9),
]


@pytest.mark.parametrize("kwargs", WARPED)
def test_warpers_equal_transformers(kwargs):
    p = SamplingParams(do_sample=True, **kwargs)
    logits = _logits(6, 4, vocab=64)
    expected = _reference_warped(logits, p)
    got = sampler._warp(logits, [p] * 6)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got.log_softmax(-1).nan_to_num(neginf=0), expected.log_softmax(-1).nan_to_num(neginf=0),
                          atol=1e-5)


def test_warpers_per_row_in_one_batch():
    params = [SamplingParams(do_sample=True, **kwargs) for kwargs in WARPED]
    logits = _logits(len(params), 5, vocab=64)
    got = sampler._warp(logits, params)
    for i, p in enumerate(params):
        expected = _reference_warped(logits[i:i + 1], p)
        assert torch.equal(torch.isinf(got[i:i + 1]), torch.isinf(expected)), p


@pytest.mark.parametrize("kwargs", WARPED)
def test_reported_logprobs_are_the_warped_distribution(kwargs):
    """With the whole vocabulary asked for, the alternatives are transformers' warped log_softmax."""
    p = SamplingParams(do_sample=True, top_logprobs=VOCAB, **kwargs)
    logits = _logits(1, 6)
    expected = _reference_warped(logits, p).log_softmax(-1)[0]
    row = RowSampler(p, 3, CPU)
    for _ in range(10):
        got = sample(logits, [row])
        token = got.tokens[0]
        assert torch.isfinite(expected[token])
        assert got.logprobs[0] == pytest.approx(expected[token].item(), abs=1e-5)
        top = dict(got.top[0])
        assert set(top) == {i for i in range(VOCAB) if torch.isfinite(expected[i])}
        for t, v in top.items():
            assert v == pytest.approx(expected[t].item(), abs=1e-5)
        assert list(top.values()) == sorted(top.values(), reverse=True)


@pytest.mark.parametrize("penalty", [1.4, 0.6])
def test_repetition_penalty_equals_transformers(penalty):
    logits = _logits(3, 7)
    history, outputs = _history(3, 7)
    expected = torch.cat([RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([h]), logits[i:i + 1].clone())
                          for i, h in enumerate(history)])
    rows = _rows([SamplingParams(repetition_penalty=penalty)] * 3)
    assert torch.allclose(sampler._process(logits, rows, history, outputs), expected)


def test_logit_bias_equals_transformers_sequence_bias():
    bias = ((0, 3.5), (5, -100.0), (19, 0.25))
    logits = _logits(2, 8)
    expected = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias])(torch.tensor([[1, 2], [3, 4]]), logits.clone())
    rows = _rows([SamplingParams(logit_bias=bias)] * 2)
    assert torch.allclose(sampler._process(logits, rows, None, None), expected)


def test_min_tokens_equals_transformers_min_new_tokens():
    logits = _logits(1, 9)
    logits[0, EOS] = logits[0, 7] = 50.0  # both end tokens the best by far
    params = SamplingParams(max_new_tokens=10, min_tokens=3, stop_token_ids=(7,))
    row = _rows([params])
    for generated in range(5):
        prompt = [1, 1, 1, 1]
        ids = torch.tensor([prompt + [4] * generated])
        expected = MinNewTokensLengthLogitsProcessor(len(prompt), 3, [EOS, 7])(ids, logits.clone())
        got = sampler._process(logits, row, [prompt + [4] * generated], [[4] * generated])
        assert torch.equal(got, expected), generated
        assert (sample(logits, row, [prompt + [4] * generated], [[4] * generated]).tokens[0] in (EOS, 7)) == (generated >= 3)


def test_min_tokens_leaves_eos_alone_when_ignore_eos():
    row = _rows([SamplingParams(max_new_tokens=5, min_tokens=5, ignore_eos=True)])
    assert row[0].min_tokens_masked == []


def test_frequency_and_presence_penalties_are_openais():
    """OpenAI's definition: logit - count * frequency_penalty - (count > 0) * presence_penalty, over the output."""
    logits = _logits(2, 10)
    history = [[9, 9, 9, 1, 2, 2], [3]]
    outputs = [[1, 2, 2], [3]]  # the prompt's 9s do not count
    params = SamplingParams(frequency_penalty=0.75, presence_penalty=-1.25)
    got = sampler._process(logits, _rows([params] * 2), history, outputs)
    expected = logits.clone()
    for row, out in enumerate(outputs):
        for token, count in collections.Counter(out).items():
            expected[row, token] -= count * 0.75 + (-1.25)
    assert torch.allclose(got, expected)
    assert torch.equal(logits, _logits(2, 10)), "the caller's logits were modified"


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    logits = probs.log()[None].expand(4, -1)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    counts = collections.Counter()
    for _ in range(2000):
        counts.update(sampler._draw(logits, gens).tolist())
    assert counts[4] == 0
    for token, p in enumerate(probs.tolist()[:4]):
        assert counts[token] / 8000 == pytest.approx(p, abs=0.025)


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param", [
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(presence_penalty=-3.0), "presence_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(logit_bias=((1, 101.0),)), "logit_bias"),
    (dict(logit_bias=((-1, 1.0),)), "logit_bias"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(typical_p=1.5), "typical_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(max_new_tokens=5, min_tokens=6), "min_tokens"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids"),
    (dict(top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=-1), "top_logprobs"),
])
def test_invalid_params(kwargs, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_token_ids_checked_against_the_vocabulary():
    SamplingParams(logit_bias=((19, 1.0),), stop_token_ids=(19,)).check_token_ids(20)
    for kwargs, param in ((dict(logit_bias=((20, 1.0),)), "logit_bias"), (dict(stop_token_ids=(25,)), "stop_token_ids")):
        with pytest.raises(InvalidRequest) as info:
            SamplingParams(**kwargs).check_token_ids(20)
        assert info.value.param == param


@pytest.mark.parametrize("kwargs, sampling", [
    (dict(typical_p=0.9), True), (dict(typical_p=1.0), False), (dict(min_p=0.1), True),
    (dict(frequency_penalty=1.0), False), (dict(logit_bias=((1, 1.0),)), False), (dict(top_logprobs=5), False),
])
def test_sampling_rule(kwargs, sampling):
    assert SamplingParams(**kwargs).sampling is sampling
