"""server/engine/sampler.py and SamplingParams: greedy, top-k, top-p, temperature, repetition
penalty, per-row generators, and parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.request import InvalidRequest, SamplingParams
from server.engine.sampler import RowSampler
from server.engine.sampler import sample as _sample


def sample(*args):
    """The chosen tokens and their log-probabilities (the alternatives are tested in test_sampler_batched.py)."""
    return _sample(*args)[:2]


CPU = torch.device("cpu")
VOCAB = 64


def _rows(*params: SamplingParams, seed: int = 0) -> list[RowSampler]:
    return [RowSampler(p, seed + i, CPU) for i, p in enumerate(params)]


def _logits(rows: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


def test_greedy_is_argmax():
    logits = _logits(5)
    rows = _rows(*[SamplingParams()] * 5)
    assert all(r.generator is None for r in rows)
    tokens, logprobs = sample(logits, rows, [[]] * 5)
    assert tokens == logits.argmax(dim=-1).tolist()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_greedy_accepts_half_precision_logits():
    logits = _logits(3).to(torch.bfloat16)
    tokens, _ = sample(logits, _rows(*[SamplingParams()] * 3), [[]] * 3)
    assert tokens == logits.float().argmax(dim=-1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(do_sample=True, temperature=0),
    SamplingParams(temperature=0.0, top_k=5, top_p=0.5),
])
def test_temperature_zero_is_greedy(params):
    assert not params.sampling
    logits = _logits(3)
    tokens, _ = sample(logits, _rows(params, params, params), [[]] * 3)
    assert tokens == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("seed", range(10))
def test_top_k_1_is_greedy(seed):
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=1)
    logits = _logits(4, seed)
    tokens, logprobs = sample(logits, _rows(*[params] * 4, seed=seed), [[]] * 4)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == pytest.approx([0.0] * 4, abs=1e-6)  # the only token left has probability 1


@pytest.mark.parametrize("seed", range(10))
def test_tiny_top_p_is_greedy(seed):
    params = SamplingParams(do_sample=True, temperature=1.0, top_p=1e-6)
    logits = _logits(4, seed)
    tokens, logprobs = sample(logits, _rows(*[params] * 4, seed=seed), [[]] * 4)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == pytest.approx([0.0] * 4, abs=1e-6)


def test_top_k_draws_only_from_the_k_best():
    logits = _logits(1, 3)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    row = _rows(SamplingParams(do_sample=True, top_k=3, temperature=2.0), seed=11)
    drawn = {sample(logits, row, [[]])[0][0] for _ in range(200)}
    assert drawn <= top3
    assert len(drawn) == 3  # at temperature 2 all three come up in 200 draws


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()[None]
    row = _rows(SamplingParams(do_sample=True, top_p=0.5), seed=5)
    drawn = [sample(logits, row, [[]]) for _ in range(300)]
    assert {t[0] for t, _ in drawn} == {0, 1}
    for (token,), (lp,) in drawn:
        assert lp == pytest.approx(math.log(probs[token].item() / 0.7), abs=1e-5)


@pytest.mark.parametrize("params", [
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    SamplingParams(do_sample=True, temperature=1.3, top_k=5),
    SamplingParams(do_sample=True, top_p=0.6),
])
def test_logprobs_equal_transformers_warpers(params):
    """The sampled row's log-probabilities are those of transformers' temperature/top-k/top-p warpers."""
    logits = _logits(1, 7)
    warped = logits.clone()
    warped = TemperatureLogitsWarper(params.temperature)(None, warped)
    if params.top_k:
        warped = TopKLogitsWarper(params.top_k)(None, warped)
    if params.top_p is not None:
        warped = TopPLogitsWarper(params.top_p)(None, warped)
    expected = torch.log_softmax(warped, dim=-1)[0]
    row = _rows(params, seed=1)
    for _ in range(50):
        (token,), (lp,) = sample(logits, row, [[]])
        assert torch.isfinite(expected[token]), "drew a token transformers' warpers remove"
        assert lp == pytest.approx(expected[token].item(), abs=1e-5)


def test_same_seed_same_draws_whatever_the_batch():
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    logits = _logits(3, 2)
    alone = RowSampler(params, 1234, CPU)
    alone_tokens = [sample(logits[1:2], [alone], [[]])[0][0] for _ in range(20)]
    batch = [RowSampler(SamplingParams(do_sample=True), 99, CPU), RowSampler(params, 1234, CPU),
             RowSampler(SamplingParams(), 0, CPU)]
    batch_tokens = [sample(logits, batch, [[]] * 3)[0][1] for _ in range(20)]
    assert batch_tokens == alone_tokens
    assert len(set(alone_tokens)) > 1


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, 1.5, -0.5, -1.0, 0.5, -3.0]])
    history = [0, 2, 2, 5]  # repeats count once
    params = SamplingParams(repetition_penalty=2.0)
    tokens, logprobs = sample(logits, _rows(params), [history])
    penalized = torch.tensor([[1.0, 1.5, -1.0, -1.0, 0.5, -6.0]])  # positive / 2, negative * 2
    assert tokens == [1]  # token 0 was best, but it was already seen
    assert logprobs[0] == pytest.approx(torch.log_softmax(penalized, -1)[0, 1].item(), abs=1e-6)
    assert logits[0, 0] == 2.0, "the caller's logits were modified"


def test_repetition_penalty_equals_transformers():
    logits = _logits(1, 4)
    history = [3, 5, 7, 11, 3, 60]
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), logits.clone())
        params = SamplingParams(do_sample=True, temperature=1.0, repetition_penalty=penalty)
        row = RowSampler(params, 0, CPU)
        (token,), (lp,) = sample(logits, [row], [history])
        assert lp == pytest.approx(torch.log_softmax(expected, -1)[0, token].item(), abs=1e-5)


def test_repetition_penalty_only_on_its_row():
    logits = _logits(2, 9)
    top = logits.argmax(dim=-1).tolist()
    rows = _rows(SamplingParams(repetition_penalty=100.0), SamplingParams())
    tokens, _ = sample(logits, rows, [[top[0]], [top[1]]])
    assert tokens[0] != top[0]
    assert tokens[1] == top[1]


@pytest.mark.parametrize("penalty", [None, 1.0])
def test_no_penalty(penalty):
    logits = _logits(1, 1)
    top = int(logits.argmax())
    tokens, _ = sample(logits, _rows(SamplingParams(repetition_penalty=penalty)), [[top]])
    assert tokens == [top]


# --- SamplingParams validation --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**63), "seed"),
    (dict(stop=("",)), "stop"),
])
def test_invalid_params(kwargs, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert str(info.value).startswith(param)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=1), dict(temperature=0), dict(top_p=1.0), dict(top_k=0), dict(repetition_penalty=1.0),
    dict(seed=0), dict(seed=2**63 - 1), dict(stop=("\n", "END")),
])
def test_valid_params(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, sampling", [
    (dict(), False),
    (dict(do_sample=True), True),
    (dict(temperature=0.7), True),
    (dict(top_k=10), True),
    (dict(top_p=0.9), True),
    (dict(top_p=1.0), False),
    (dict(top_k=0), False),
    (dict(do_sample=True, temperature=0), False),
    (dict(repetition_penalty=1.2), False),
])
def test_sampling_rule(kwargs, sampling):
    assert SamplingParams(**kwargs).sampling is sampling
    assert (RowSampler(SamplingParams(**kwargs), 0, CPU).generator is not None) is sampling
