"""Every adapter variant on every architecture: the engine's greedy tokens equal PEFT's, the table
materialized from a training checkpoint equals what PEFT saves, and the cached prefix gives PEFT's
logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers.cache_utils import DynamicCache

from adapters import KINDS
from adapters.loading import parse_config, parse_weights, read_table
from server.engine.request import SamplingParams
from tests.conftest import MAX_NEW, PEFT_TYPES, PROMPTS
from tests.factory import ARCHITECTURES, VARIANTS, peft_model

ENCODER_VARIANTS = list(VARIANTS)  # prompt (embedding), mlp, lstm, prefix (embedding), prefix-proj


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_tokens_equal_peft(worlds, arch, variant, paths):
    w = worlds.get(arch)
    adapter = w.adapter(variant)
    assert adapter.peft_type == PEFT_TYPES[variant]
    assert adapter.prefix_length == adapter.num_virtual_tokens == w.config(variant)["num_virtual_tokens"]
    engine = w.engine(paths=paths)
    for text in PROMPTS:
        ids = w.ids(text)
        seq = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW), adapter)
        expected = w.reference(variant, ids)
        assert seq.output_ids == expected, f"{arch}/{variant} prompt {text!r}"
        assert seq.finish_reason is not None
        # Tokens of tiny random models repeat a lot; the log-probabilities check every step closely.
        expected_lp = w.reference_logprobs(variant, ids, expected)
        assert seq.logprobs == pytest.approx(expected_lp, abs=1e-4), f"{arch}/{variant} prompt {text!r}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_adapter_equals_base_generate(worlds, arch, paths):
    w = worlds.get(arch)
    engine = w.engine(paths=paths)
    for text in PROMPTS:
        ids = w.ids(text)
        seq = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW))
        assert seq.output_ids == w.reference(None, ids), f"{arch} prompt {text!r}"
        expected_lp = w.reference_logprobs(None, ids, seq.output_ids)
        assert seq.logprobs == pytest.approx(expected_lp, abs=1e-4), f"{arch} prompt {text!r}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapters_change_the_distribution(worlds, arch):
    """Sanity of the fixtures: every adapter moves the base model's next-token logits, so parity
    with PEFT means something (greedy tokens of tiny random models often repeat the last token)."""
    w = worlds.get(arch)
    ids = torch.tensor([w.ids(PROMPTS[1])])
    with torch.no_grad():
        base = w.model(input_ids=ids).logits[0, -1]
        for variant in VARIANTS:
            logits = peft_model(w.model_dir, w.adapter_dirs[variant])(input_ids=ids).logits[0, -1]
            assert (logits - base).abs().max() > 1e-2, f"{arch}/{variant} does not change the logits"


@pytest.mark.parametrize("variant", ENCODER_VARIANTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_materializes_to_saved_table(worlds, arch, variant):
    """Encoder weights as a training checkpoint holds them are run once: the table equals PEFT's."""
    w = worlds.get(arch)
    saved = load_file(str(w.adapter_dirs[variant] / "adapter_model.safetensors"))
    assert set(saved) == {"prompt_embeddings"}
    ckpt = w.checkpoint_dirs[variant]
    config = parse_config((ckpt / "adapter_config.json").read_bytes())
    tensors = parse_weights((ckpt / "adapter_model.safetensors").read_bytes())
    assert "prompt_embeddings" not in tensors
    kind = KINDS[config["peft_type"]]
    table = read_table(kind, config, tensors, w.spec)
    assert table.shape == saved["prompt_embeddings"].shape
    torch.testing.assert_close(table, saved["prompt_embeddings"].float(), atol=1e-5, rtol=0)

    # Through the registry too: the materialized adapter equals the one from save_pretrained's file.
    from_ckpt = w.registry.add_dir(f"ckpt-{variant}", ckpt, source="test")
    try:
        reference = w.adapter(variant)
        assert from_ckpt.kv.shape == reference.kv.shape
        torch.testing.assert_close(from_ckpt.kv, reference.kv, atol=1e-5, rtol=0)
        if reference.embeddings is None:
            assert from_ckpt.embeddings is None
        else:
            torch.testing.assert_close(from_ckpt.embeddings, reference.embeddings, atol=1e-5, rtol=0)
    finally:
        w.registry.remove(f"ckpt-{variant}")


@pytest.mark.parametrize("variant", ["prompt", "ptuning-mlp", "prefix"])
def test_checkpoint_greedy_equals_peft(llama, variant):
    """A checkpoint-materialized adapter serves the same tokens as PEFT with the saved adapter."""
    adapter = llama.registry.add_dir(f"ckpt2-{variant}", llama.checkpoint_dirs[variant], source="test")
    try:
        ids = llama.ids(PROMPTS[1])
        seq = llama.engine().generate(ids, SamplingParams(max_new_tokens=MAX_NEW), adapter)
        assert seq.output_ids == llama.reference(variant, ids)
    finally:
        llama.registry.remove(f"ckpt2-{variant}")


def _first_logits_from_prefix(model, kv: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The base model fed `kv` ([layers, 2, kv_heads, n, head_dim]) as past key/values."""
    n = kv.shape[3]
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0][None].clone(), kv[layer, 1][None].clone(), layer)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=torch.ones(1, n + len(ids), dtype=torch.long),
            position_ids=torch.arange(n, n + len(ids))[None],
            past_key_values=cache,
            use_cache=True,
        )
    return out.logits[:, -1]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_logits_equal_peft(worlds, arch, variant):
    """Serving from the cached KV prefix gives PeftModel's logits (prompt tuning included)."""
    w = worlds.get(arch)
    adapter = w.adapter(variant)
    peft = peft_model(w.model_dir, w.adapter_dirs[variant])
    assert isinstance(peft, PeftModel)
    for text in PROMPTS:
        ids = w.ids(text)
        with torch.no_grad():
            expected = peft(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        ours = _first_logits_from_prefix(w.model, adapter.kv, ids)
        torch.testing.assert_close(ours, expected.logits[:, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_engine_first_logprob_matches_peft(worlds, arch):
    """The engine's own runner (dense KV batch, explicit positions) scores the first token as PEFT does."""
    w = worlds.get(arch)
    peft = peft_model(w.model_dir, w.adapter_dirs["prompt"])
    ids = w.ids(PROMPTS[1])
    seq = w.engine().generate(ids, SamplingParams(max_new_tokens=1), w.adapter("prompt"))
    with torch.no_grad():
        logits = peft(input_ids=torch.tensor([ids])).logits[0, -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    assert seq.output_ids == [int(logits.argmax())]
    assert abs(seq.logprobs[0] - float(logprobs[seq.output_ids[0]])) < 1e-4


def test_prompt_kinds_keep_embeddings(llama):
    for variant in VARIANTS:
        adapter = llama.adapter(variant)
        saved = load_file(str(llama.adapter_dirs[variant] / "adapter_model.safetensors"))["prompt_embeddings"]
        if KINDS[adapter.peft_type].rows_are_embeddings:
            assert adapter.embeddings is not None
            torch.testing.assert_close(adapter.embeddings, saved.float(), atol=0, rtol=0)
        else:
            assert adapter.embeddings is None
        spec = llama.spec
        assert tuple(adapter.kv.shape) == (
            spec.num_layers, 2, spec.num_kv_heads, adapter.num_virtual_tokens, spec.head_dim
        )
        assert adapter.describe()["prefix_bytes"] == adapter.kv.numel() * 4
        assert json.loads(json.dumps(adapter.describe()))["name"] == variant
