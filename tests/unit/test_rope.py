"""Length-dependent RoPE (`server/engine/rope.py`): in a packed step each request is rotated for
its own length, as transformers rotates it alone; and such a model serves its scaled positions."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.demo.tiny import save_tiny_model
from server.engine import rope
from server.engine.engine import Engine
from server.engine.request import InvalidRequest, SamplingParams, Sequence
from server.model import load_base_model

POSITIONS = 64  # max_position_embeddings: the long prompt goes past it, the short ones stay under
ROPE = {
    "dynamic": dict(rope_type="dynamic", factor=4.0),
    "longrope": dict(rope_type="longrope", original_max_position_embeddings=POSITIONS,  # head_dim 16: 8 factors
                     short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], long_factor=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
}
NEW = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    return {kind: save_tiny_model(root / kind, "llama", seed=0, rope_parameters=params,
                                  max_position_embeddings=POSITIONS * (4 if kind == "longrope" else 1))
            for kind, params in ROPE.items()}


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (10, 100, 30, 70)]


def _alone(path, prompt: list[int]) -> list[int]:
    """transformers' generate on the request alone, the model freshly loaded (its rotary state is kept across calls)."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _served(path, prompts, lean: bool, **engine_kwargs) -> list[list[int]]:
    base = load_base_model(str(path), dtype="float32")
    engine = Engine(base.model, base.tokenizer, base.spec, **engine_kwargs)
    assert engine.runner.rope
    if not lean:
        engine.runner.lean = None
    assert (engine.runner.lean is not None) == lean
    seqs = [engine.submit(Sequence(p, SamplingParams(max_new_tokens=NEW, ignore_eos=True))) for p in prompts]
    while engine.has_work():  # all in one packed step, then decoding together
        engine.step()
    rotary = base.model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, rotary.original_inv_freq)  # no state carried from one step to the next
    assert rotary.max_seq_len_cached == rotary.original_max_seq_len
    return [seq.output_ids for seq in seqs]


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "transformers"])
@pytest.mark.parametrize("kind", sorted(ROPE))
def test_packed_dynamic_rope_equals_each_request_alone(models, kind, lean):
    """Short requests packed beside a long one (past max_position_embeddings), through the written-out
    forward and through transformers' own: each gets the tokens it gets alone. (transformers' own rotary
    module, given the packed step, rotates every request for the longest length.)"""
    prompts = _prompts()
    assert _served(models[kind], prompts, lean) == [_alone(models[kind], p) for p in prompts]


def test_packed_dynamic_rope_equals_each_request_alone_chunked_prompt(models):
    """The long prompt computed in chunks of 32 tokens is rotated for its whole length, as alone."""
    prompts = _prompts()[:2]
    served = _served(models["dynamic"], prompts, lean=True, max_prefill_tokens=32)
    assert served == [_alone(models["dynamic"], p) for p in prompts]


def test_static_rope_is_not_wrapped(tmp_path):
    path = save_tiny_model(tmp_path / "linear", "llama", rope_parameters=dict(rope_type="linear", factor=2.0))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert not rope.install(model)
    assert "forward" not in vars(model.model.rotary_emb)


def _service(path):
    from adapters import AdapterRegistry
    from server.api.service import Service
    from server.config import Config
    from server.engine.async_engine import AsyncEngine

    base = load_base_model(str(path), dtype="float32")
    engine = Engine(base.model, base.tokenizer, base.spec)
    return Service(Config(), base, AdapterRegistry(base.spec, base.model), AsyncEngine(engine))


def test_dynamic_rope_serves_its_scaled_positions(models, tmp_path):
    """max_position_embeddings 64 with dynamic scaling by 4: 256 positions served, not one more;
    a model without dynamic scaling keeps its 64."""
    service = _service(models["dynamic"])
    assert service.base.max_positions == 4 * POSITIONS
    prepare = lambda n, new: asyncio.run(service.prepare("generate", [5] * n, SamplingParams(max_new_tokens=new), None))  # noqa: E731
    assert len(prepare(200, 56).prompt_ids) == 200  # past 64: served
    with pytest.raises(InvalidRequest, match="exceeds the model's 256 positions"):
        prepare(200, 57)
    plain = _service(save_tiny_model(tmp_path / "plain", "llama", max_position_embeddings=POSITIONS))
    assert plain.base.max_positions == POSITIONS
    with pytest.raises(InvalidRequest, match="exceeds the model's 64 positions"):
        asyncio.run(plain.prepare("generate", [5] * 60, SamplingParams(max_new_tokens=5), None))
