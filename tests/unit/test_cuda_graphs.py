"""Decode steps from CUDA graphs (server/engine/cuda_graphs.py), on CPU: no graph is recorded here,
but the static-buffer step the graphs replay runs eagerly (`capture=False`), with a CPU reference of
flash attention's variable-length kernel, and must give every request the tokens of the eager step:
batches padded to their bucket, shared prefixes and none, requests joining and leaving."""

from __future__ import annotations

import pytest
import torch

from server.engine import flash_varlen
from server.engine.cuda_graphs import DecodeGraphs, buckets
from server.engine.fast_path import FastPaths
from server.engine.model_runner import ModelRunner
from server.engine.request import SamplingParams, Sequence
from tests.conftest import PROMPTS
from tests.unit.test_engine import _drain, check_memory
from tests.unit.test_kv_pool import _flash_varlen_reference

EAGER = FastPaths(linear="torch", native_decode="off")  # the Python layers: what a GPU runs
REQUESTS = [("prefix", 0, 12), (None, 1, 9), ("prompt", 0, 12), ("prefix", 1, 5), ("ptuning-mlp", 0, 12)]


def test_buckets_are_vllms():
    assert buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert buckets(20) == [1, 2, 4, 8, 16, 24]
    assert buckets(5) == [1, 2, 4, 8]
    assert buckets(1) == [1]


def _flash_with_empty_sequences():
    """The reference kernel, taking a sequence with no keys as FlashAttention-2 does: zeros out and a
    log-sum-exp of +inf (the recorded step's rows without a prefix; `has_prefix` must merge them away)."""
    reference = _flash_varlen_reference(bottom_right=True)

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, debug, *, scale=None, seqused_k=None):
        used = seqused_k.tolist()
        kept = [i for i, n in enumerate(used) if n > 0]
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("inf"))
        if kept:
            rows = [r for i in kept for r in range(int(cu_q[i]), int(cu_q[i + 1]))]
            lengths = [int(cu_q[i + 1]) - int(cu_q[i]) for i in kept]
            sub_cu_q = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
            sub_cu_k = torch.tensor([int(cu_k[i]) for i in kept] + [int(cu_k[-1])], dtype=torch.int32)
            o, lse_kept = reference(q[rows], k, v, sub_cu_q, sub_cu_k, max_q, max_k, dropout_p, is_causal, debug,
                                    scale=scale, seqused_k=seqused_k[kept])[:2]
            out[rows], lse[:, rows] = o, lse_kept
        return out, lse, None, None, None

    return forward


def _run(llama, engine, waves) -> list[Sequence]:
    """Submit each wave, stepping between them, so that batches of several sizes decode."""
    submitted = []
    for wave in waves:
        for variant, prompt, new in wave:
            submitted.append(engine.submit(Sequence(llama.ids(PROMPTS[prompt]), SamplingParams(max_new_tokens=new),
                                                    llama.adapter(variant))))
        for _ in range(3):
            engine.step()
            check_memory(engine)
    _drain(engine, on_step=lambda _: check_memory(engine))
    return submitted


@pytest.fixture
def graphed(monkeypatch):
    """Flash attention on CPU (the reference kernel), and engines whose runners decode through the
    static-buffer step."""
    monkeypatch.setattr(flash_varlen, "_FLASH_VARLEN", _flash_with_empty_sequences())
    monkeypatch.setattr(flash_varlen, "usable", lambda q, kv_heads, window: not window)

    def attach(engine, largest: int):
        engine.runner.graphs = DecodeGraphs(engine.runner, largest, capture=False)
        return engine

    return attach


def test_the_recorded_step_gives_the_eager_tokens(llama, graphed):
    waves = [REQUESTS[:1], REQUESTS[1:4], REQUESTS[4:]]  # 1, then 4 (a full bucket), then 5 (padded to 8)
    eager = _run(llama, llama.engine(paths=EAGER), waves)
    engine = graphed(llama.engine(paths=EAGER, max_batch_size=8), 8)
    got = _run(llama, engine, waves)
    assert engine.runner.graphs.replays > 10
    for want, seq in zip(eager, got):
        assert seq.output_ids == want.output_ids
        assert seq.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert llama.reference("prefix", llama.ids(PROMPTS[0]), 12) == got[0].output_ids  # and PEFT's
    assert engine.runner.pool.held == 1  # the scratch slot alone


def test_padding_rows_touch_nothing_but_the_scratch_slot(llama, graphed):
    engine = graphed(llama.engine(paths=EAGER, max_batch_size=8), 8)
    seqs = [engine.submit(Sequence(llama.ids(PROMPTS[i % 2]), SamplingParams(max_new_tokens=6), llama.adapter(v)))
            for i, v in enumerate(["prefix", None, "prompt"])]
    engine.step()  # the prefill
    pool = engine.runner.pool
    before = pool.kv.clone()
    scratch = engine.runner.graphs.scratch.start
    engine.step()  # 3 decoding requests in the bucket of 4: one padding row
    written = (pool.kv != before).any(dim=(0, 1, 2, 4)).nonzero().flatten().tolist()
    expected = sorted([s.segment.start + s.segment.length - 1 for s in seqs] + [scratch])
    assert written == expected
    _drain(engine)


def test_steps_with_a_prefill_or_scored_prompt_run_eagerly(llama, graphed):
    engine = graphed(llama.engine(paths=EAGER, max_batch_size=4), 4)
    graphs = engine.runner.graphs
    engine.submit(Sequence(llama.ids(PROMPTS[1]), SamplingParams(max_new_tokens=3)))
    engine.step()
    assert graphs.replays == 0  # a prefill
    engine.submit(Sequence(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=3, prompt_logprobs=True)))
    engine.step()
    assert graphs.replays == 0  # a decode beside a prefill
    engine.step()
    assert graphs.replays == 1  # both decode
    assert graphs.takes([1, 1], [0, 1], []) and not graphs.takes([1, 2], [0, 1], [])
    assert not graphs.takes([1] * 5, list(range(5)), [])  # more than the largest bucket
    _drain(engine)


def test_a_failed_step_takes_the_scratch_slot_again(llama, graphed):
    engine = graphed(llama.engine(paths=EAGER, max_batch_size=4), 4)
    engine.runner.reset()  # the pool cleared, the scratch slot with it
    assert engine.runner.graphs.scratch.capacity == 1 and engine.runner.pool.held == 1
    got = _run(llama, engine, [REQUESTS[:2]])
    assert got[0].output_ids == llama.reference("prefix", llama.ids(PROMPTS[0]), 12)


def test_cuda_graphs_are_not_taken_on_cpu(llama):
    runner = ModelRunner(llama.model, llama.spec, kv_cache_bytes=1 << 20)
    assert runner.graphs is None and runner.describe()["cuda_graphs"] is None
    assert DecodeGraphs.unavailable(runner) == "the model is not on a CUDA device"
    with pytest.raises(ValueError, match="CUDA graphs cannot be recorded here: the model is not on a CUDA device"):
        ModelRunner(llama.model, llama.spec, 1 << 20, paths=FastPaths(cuda_graphs="on"))
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        FastPaths(cuda_graphs="sometimes")
