"""Run-to-run determinism: the same requests give the same greedy tokens however they are grouped into
steps (over HTTP, arrival timing decides the grouping). Guaranteed, and tested here: float32 on every
path; bfloat16 on the batch-invariant path (the AVX2 linear kernel, attention on our kernel or SDPA).
Not guaranteed: bfloat16 with oneDNN's linears (`--cpu-linear auto` on AVX-512/AMX CPUs), whose
rounding depends on the step's row count (docs/architecture.md, "Determinism")."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterRegistry
from server.engine.cpu import linear as cpu_linear
from server.engine.engine import Engine
from server.engine.fast_path import FastPaths
from server.engine.request import SamplingParams, Sequence
from server.model import load_base_model

GROUPINGS = ([12], [1] * 12, [5, 4, 3])  # requests submitted per round, two steps apart
NEW_TOKENS = 24


def _requests(tokenizer) -> list[str]:
    """Prompts of 2 to 60 tokens: with a prefill budget of 24 tokens a step, how each is cut into chunks
    depends on what arrived with it."""
    return [("the quick brown fox jumps over " * 3)[: 5 * i + 2] for i in range(12)]


def _run(engine: Engine, prompts: list[list[int]], adapters: list, groups: list[int]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    seqs, at = [], 0
    for size in groups:
        for ids, adapter in zip(prompts[at:at + size], adapters[at:at + size]):
            seqs.append(engine.submit(Sequence(list(ids), params, adapter)))
        at += size
        for _ in range(2):
            if engine.has_work():
                engine.step()
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def _same_whatever_the_grouping(base, registry, paths: FastPaths) -> None:
    engine = Engine(base.model, base.tokenizer, base.spec, max_prefill_tokens=24, paths=paths)
    prompts = [base.tokenizer(text).input_ids for text in _requests(base.tokenizer)]
    adapters = [registry.get(name) if name else None for name in [None, "prompt", "prefix"] * 4]
    first = _run(engine, prompts, adapters, GROUPINGS[0])
    assert len({tuple(t) for t in first}) > 6  # the requests do differ
    for groups in GROUPINGS[1:]:
        assert _run(engine, prompts, adapters, groups) == first, f"grouped {groups}"


def test_float32_tokens_do_not_depend_on_the_grouping(llama, paths):
    registry = AdapterRegistry(llama.spec, llama.model)
    for variant in ("prompt", "prefix"):
        registry.add_dir(variant, llama.adapter_dirs[variant], source="test")
    _same_whatever_the_grouping(llama.base, registry, paths)


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_bfloat16_tokens_do_not_depend_on_the_grouping_on_the_avx2_kernel(llama, attention, cpu_kernels_built):
    problem = cpu_linear.unavailable("avx2", torch.bfloat16)
    if problem:
        pytest.skip(f"the AVX2 linear kernel cannot run here: {problem}")
    base = load_base_model(str(llama.model_dir), dtype="bfloat16")
    registry = AdapterRegistry(base.spec, base.model)
    for variant in ("prompt", "prefix"):
        registry.add_dir(variant, llama.adapter_dirs[variant], source="test")
    _same_whatever_the_grouping(base, registry, FastPaths(linear="avx2", attention=attention))
