"""Linear layers on packed weights (`cpu_linear`), through the AVX2 kernel and through oneDNN: the same
outputs, memory not doubled, the plain weights given back exactly, and every layer left alone when
packing cannot be used."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.demo.tiny import seeded_init, tiny_config
from server.engine import cpu_kernels, cpu_linear


def _model(arch: str):
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden_size=64, num_layers=2)).eval()
    seeded_init(model, seed=1)
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}


AVX2 = torch.backends.cpu.get_cpu_capability() == "AVX2"


@pytest.fixture(params=["kernel", "onednn"])
def backend(request, monkeypatch):
    """Each packing: the AVX2 kernel where this CPU and compiler have it, oneDNN as on any other CPU."""
    if request.param == "kernel":
        if not AVX2:
            pytest.skip("the AVX2 kernel is used only on CPUs whose best vector unit is AVX2")
        request.getfixturevalue("cpu_kernels_built")
    else:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    return request.param


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's tiny config ties lm_head to the embeddings, has biases
def test_packed_model_computes_the_same_and_unpacks_exactly(arch, backend):
    model = _model(arch)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    plain = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    tied = model.lm_head.weight is model.get_input_embeddings().weight

    packed = cpu_linear.install(model)
    assert packed == len(plain)
    assert getattr(model.lm_head, cpu_linear.PACKED).is_mkldnn == (backend == "onednn")
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


def test_bfloat16_is_packed_natively_or_widened_to_float32(backend):
    """The kernel keeps bfloat16 weights and oneDNN packs them natively where it can; elsewhere oneDNN
    packs them as float32. Each output is rounded back to bfloat16."""
    model = _model("llama").to(torch.bfloat16)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    plain = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    assert cpu_linear.install(model) == len(plain)
    native = backend == "kernel" or cpu_linear._probe(cpu_linear._onednn(torch.bfloat16), torch.bfloat16) == ""
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


def test_a_dtype_no_packing_takes_leaves_every_layer_alone(monkeypatch):
    model = _model("llama")
    monkeypatch.setattr(cpu_linear, "_probe", lambda backend, dtype: "no packing for this dtype here")
    assert cpu_linear.install(model) == 0
    assert all(layer.weight.numel() > 0 and not hasattr(layer, cpu_linear.PACKED) for layer in _linears(model).values())


def test_probe_accepts_float32_and_answers_bfloat16_either_way():
    assert cpu_linear._probe(cpu_linear._ONEDNN, torch.float32) == ""
    bfloat16 = cpu_linear._onednn(torch.bfloat16)
    assert isinstance(cpu_linear._probe(bfloat16, torch.bfloat16), str)  # '' only with AVX512-BF16 / AVX-NE-CONVERT


@pytest.mark.skipif(not AVX2, reason="the AVX2 kernel is used only on CPUs whose best vector unit is AVX2")
@pytest.mark.parametrize("out_features", [1, 16, 17, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_linear_at_every_row_count(cpu_kernels_built, out_features, bias):
    """Every register tile (1-6 rows), several chunks of rows, a partly filled last block."""
    generator = torch.Generator().manual_seed(out_features)
    layer = torch.nn.Linear(67, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(generator=generator)
    packed = cpu_linear._block(layer.weight.detach())
    assert packed.shape == (-(-out_features // cpu_linear.BLOCK), 67, cpu_linear.BLOCK)
    assert torch.equal(cpu_linear._unblock(packed, out_features), layer.weight)
    for rows in [*range(0, 14), 47, 48, 49, 97, 300]:
        x = torch.randn(rows, 67, generator=generator)
        got = cpu_kernels.ops().packed_linear(x, packed, layer.bias, out_features)
        torch.testing.assert_close(got, layer(x).detach(), atol=2e-5, rtol=2e-5, msg=f"{rows} rows")
        # bfloat16 weights, widened as they are loaded: float32's result on the rounded weights
        rounded = layer.weight.detach().bfloat16()
        got = cpu_kernels.ops().packed_linear(x, cpu_linear._block(rounded), layer.bias, out_features)
        want = torch.nn.functional.linear(x, rounded.float(), layer.bias)
        torch.testing.assert_close(got, want.detach(), atol=2e-5, rtol=2e-5, msg=f"{rows} rows, bfloat16")


@pytest.mark.skipif(not AVX2, reason="the AVX2 kernel is used only on CPUs whose best vector unit is AVX2")
def test_kernel_output_does_not_depend_on_how_the_work_is_shared(cpu_kernels_built):
    """Tasks go to whichever thread asks first (csrc/common.cpp): bit-identical outputs with 1 thread,
    2, and more threads than tasks or cores."""
    generator = torch.Generator().manual_seed(0)
    packed = cpu_linear._block(torch.randn(300, 67, generator=generator))
    bias = torch.randn(300, generator=generator)
    before = torch.get_num_threads()
    try:
        for rows in (1, 5, 100):
            x = torch.randn(rows, 67, generator=generator)
            outs = []
            for threads in (1, 2, 7):
                torch.set_num_threads(threads)
                outs.append(cpu_kernels.ops().packed_linear(x, packed, bias, 300))
            assert all(torch.equal(outs[0], out) for out in outs[1:]), f"{rows} rows"
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not AVX2, reason="the AVX2 kernel is used only on CPUs whose best vector unit is AVX2")
def test_kernel_refuses_what_it_cannot_compute(cpu_kernels_built):
    packed = cpu_linear._block(torch.randn(20, 8))
    op = cpu_kernels.ops().packed_linear
    for args, message in [
        ((torch.randn(3, 9), packed, None, 20), "features"),  # inputs of another width
        ((torch.randn(3, 8), packed, None, 40), "do not fit"),  # more outputs than blocks
        ((torch.randn(3, 8).double(), packed, None, 20), "float32 x"),
        ((torch.randn(3, 8), packed.double(), None, 20), "bfloat16 packed"),
        ((torch.randn(8, 3).t(), packed, None, 20), "contiguous"),
        ((torch.randn(3, 8), packed, torch.randn(19), 20), "bias"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def test_the_engine_packs_eager_and_unpacks_compiled(llama):
    """Built eager, the runner packs the shared model's linears; a compiled runner needs them plain."""
    from server.engine.model_runner import ModelRunner

    runner = ModelRunner(llama.model, llama.spec, kv_cache_bytes=1 << 20)
    assert hasattr(llama.model.lm_head, cpu_linear.PACKED)
    runner.use_compiled(object())  # any compiled forward: only its presence matters here
    assert not any(hasattr(m, cpu_linear.PACKED) for m in llama.model.modules())
    runner.use_compiled(None)
    assert hasattr(llama.model.lm_head, cpu_linear.PACKED)


def test_a_kernel_failing_its_probe_leaves_the_layers_to_onednn(monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpu_kernels, "available", lambda: True)
    probe = cpu_linear._probe
    kernel = cpu_linear._kernel(torch.float32).name
    monkeypatch.setattr(cpu_linear, "_probe",
                        lambda backend, dtype: "off on a probe" if backend.name == kernel else probe(backend, dtype))
    model = _model("llama")
    with caplog.at_level("WARNING", logger=cpu_linear.__name__):
        assert cpu_linear.install(model) == len(_linears(model))
    assert all(getattr(layer, cpu_linear.PACKED).is_mkldnn for layer in _linears(model).values())
    assert "AVX2 linear kernel is off (off on a probe)" in caplog.text
