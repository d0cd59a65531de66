"""The compiled packed forward (`--compile on`): the same tokens as the eager one, compile time
reported; and the padding CUDA graphs need (a step run as a bucket of tokens), exercised on CPU."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from server.config import load_config
from server.engine.compiled import bucket
from server.engine.request import SamplingParams, Sequence
from tests.conftest import PROMPTS

MIXED = [None, "prompt", "prefix-proj", "ptuning-lstm", None, "prefix"]


def _run(w, engine, max_new_tokens=8) -> list[list[int]]:
    seqs = [engine.submit(Sequence(w.ids(PROMPTS[i % len(PROMPTS)]), SamplingParams(max_new_tokens=max_new_tokens),
                                   w.adapter(variant)))
            for i, variant in enumerate(MIXED)]
    while engine.has_work():
        engine.step()
    return [list(s.output_ids) for s in seqs]


def test_compiled_forward_gives_the_eager_tokens(llama):
    eager = _run(llama, llama.engine(max_batch_size=4, max_prefill_tokens=16))
    engine = llama.engine(max_batch_size=4, max_prefill_tokens=16, compile=True)
    compiled = engine.runner.compiled
    assert compiled is not None and compiled.describe()["seconds"] > 0
    assert compiled.describe()["cuda_graphs"] is False
    assert _run(llama, engine) == eager  # a batch of 4 of 6 requests, prompts in chunks of 16: every kind of step
    graphs = counters["stats"]["unique_graphs"]
    _run(llama, engine, max_new_tokens=5)  # other batch sizes and lengths: no recompilation
    assert counters["stats"]["unique_graphs"] == graphs
    assert eager[1] != eager[0] and eager[2] != eager[0]  # the adapters change the output
    assert eager[1] == llama.reference("prompt", llama.ids(PROMPTS[1]), 8)


class _PadOnly:
    """What the runner asks of a compiled forward, without compiling: pads steps to buckets as
    CUDA graphs do, and records the sizes it ran."""

    def __init__(self, model):
        self.model = model
        self.runs: list[tuple[int, int, int]] = []  # (tokens run, of which the step's own, logits rows kept)

    def pad(self, n: int) -> int:
        return bucket(n, 10_000)

    def __call__(self, **inputs):
        self.runs.append((inputs["input_ids"].shape[1], inputs["ragged"].tokens, len(inputs["logits_to_keep"])))
        return self.model(**inputs)


def test_steps_padded_to_buckets_give_the_unpadded_tokens(llama):
    eager = _run(llama, llama.engine(max_batch_size=4, max_prefill_tokens=16))
    engine = llama.engine(max_batch_size=4, max_prefill_tokens=16)
    engine.runner.compiled = padder = _PadOnly(llama.model)
    assert _run(llama, engine) == eager
    assert all(run == bucket(run, 10_000) and rows == bucket(rows, 10_000) for run, _, rows in padder.runs)
    assert any(run > own for run, own, _ in padder.runs)  # some steps ran padding tokens
    assert any(own > 4 for _, own, _ in padder.runs)  # prefill chunks, not only decoding


def test_bucket_sizes():
    assert [bucket(n, 1000) for n in (0, 1, 2, 3, 5, 33, 64, 65, 200)] == [1, 1, 2, 4, 8, 64, 64, 128, 256]
    assert bucket(1001, 1000) == 1001  # past the largest bucket: as it is


def test_compile_flag():
    assert load_config([]).compile == "off"
    assert load_config(["--compile", "on"]).compile == "on"
    assert load_config(["--compile", "on", "--no-compile"]).compile == "off"
    assert load_config([], {"SOFTPROMPT_COMPILE": "on"}).compile == "on"
    with pytest.raises(SystemExit, match="--compile must be on or off"):
        load_config(["--compile", "sometimes"])
