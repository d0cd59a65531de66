"""Linear layers on oneDNN's packed weights (`cpu_linear`): the same outputs, memory not doubled,
the plain weights given back exactly, and every layer left alone when packing cannot be used."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.demo.tiny import seeded_init, tiny_config
from server.engine import cpu_linear


def _model(arch: str):
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden_size=64, num_layers=2)).eval()
    seeded_init(model, seed=1)
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's tiny config ties lm_head to the embeddings
def test_packed_model_computes_the_same_and_unpacks_exactly(arch):
    model = _model(arch)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    plain = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    tied = model.lm_head.weight is model.get_input_embeddings().weight

    packed = cpu_linear.install(model)
    assert packed == len(plain)
    assert cpu_linear.install(model) == 0  # once only
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    for name, layer in _linears(model).items():
        kept = name == "lm_head" and tied  # the embedding table still needs it
        assert layer.weight.numel() == (plain[name].numel() if kept else 0), name
        assert cpu_linear.weight_numel(layer) == plain[name].numel() + (0 if layer.bias is None else layer.bias.numel())
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied

    cpu_linear.unpack(model)
    for name, layer in _linears(model).items():
        assert torch.equal(layer.weight, plain[name]), name
        assert not hasattr(layer, cpu_linear.PACKED) and "forward" not in vars(layer)
    torch.testing.assert_close(_logits(model, ids), want, atol=0, rtol=0)


def test_bfloat16_is_packed_natively_or_widened_to_float32():
    """Natively where oneDNN packs bfloat16; elsewhere as float32, each output rounded back to bfloat16."""
    model = _model("llama").to(torch.bfloat16)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    plain = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    assert cpu_linear.install(model) == len(plain)
    native = cpu_linear._probe(torch.bfloat16) == ""
    for layer in _linears(model).values():
        assert getattr(layer, cpu_linear.PACKED).dtype == (torch.bfloat16 if native else torch.float32)
        assert layer.weight.dtype == torch.bfloat16
    got = _logits(model, ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    cpu_linear.unpack(model)
    for name, layer in _linears(model).items():
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, plain[name]), name


def test_a_dtype_onednn_cannot_pack_leaves_every_layer_alone(monkeypatch):
    model = _model("llama")
    monkeypatch.setattr(cpu_linear, "_probe", lambda dtype: "no packing for this dtype here")
    assert cpu_linear.install(model) == 0
    assert all(layer.weight.numel() > 0 and not hasattr(layer, cpu_linear.PACKED) for layer in _linears(model).values())


def test_probe_accepts_float32_and_answers_bfloat16_either_way():
    assert cpu_linear._probe(torch.float32) == ""
    assert isinstance(cpu_linear._probe(torch.bfloat16), str)  # '' only on CPUs with AVX512-BF16 / AVX-NE-CONVERT


def test_the_engine_packs_eager_and_unpacks_compiled(llama):
    """Built eager, the runner packs the shared model's linears; a compiled runner needs them plain."""
    from server.engine.model_runner import ModelRunner

    runner = ModelRunner(llama.model, llama.spec, kv_cache_bytes=1 << 20)
    assert hasattr(llama.model.lm_head, cpu_linear.PACKED)
    runner.use_compiled(object())  # any compiled forward: only its presence matters here
    assert not any(hasattr(m, cpu_linear.PACKED) for m in llama.model.modules())
    runner.use_compiled(None)
    assert hasattr(llama.model.lm_head, cpu_linear.PACKED)
