"""Linear layers on packed weights (`cpu_linear`), through the AVX2 kernel and through oneDNN: the same
outputs, memory not doubled, the plain weights given back exactly, and every layer left alone when
packing cannot be used."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.demo.tiny import seeded_init, tiny_config
from server.engine.cpu import kernels as cpu_kernels, linear as cpu_linear


def _model(arch: str):
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden_size=64, num_layers=2)).eval()
    seeded_init(model, seed=1)
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}


@pytest.fixture
def avx2_kernel(cpu_kernels_built):
    """The AVX2 kernel, on any CPU that runs it (AVX-512 ones included), whatever `auto` picks here."""
    problem = cpu_linear.unavailable("avx2")
    if problem:
        pytest.skip(f"the AVX2 linear kernel cannot run here: {problem}")


@pytest.fixture(params=["avx2", "onednn"])
def backend(request) -> str:
    """Each packing, forced (`--cpu-linear`): the AVX2 kernel where this CPU and compiler can run it, oneDNN."""
    if request.param == "avx2":
        request.getfixturevalue("avx2_kernel")
    elif cpu_linear.unavailable("onednn"):
        pytest.skip(f"oneDNN cannot pack linears here: {cpu_linear.unavailable('onednn')}")
    return request.param


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's tiny config ties lm_head to the embeddings, has biases
def test_packed_model_computes_the_same_and_unpacks_exactly(arch, backend):
    model = _model(arch)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    plain = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    tied = model.lm_head.weight is model.get_input_embeddings().weight

    packed = cpu_linear.install(model, backend)
    assert packed == len(plain)
    assert getattr(model.lm_head, cpu_linear.PACKED).is_mkldnn == (backend == "onednn")
    assert cpu_linear.install(model, backend) == 0  # once only
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


def _siblings(model) -> list[list[torch.nn.Linear]]:
    """What `LeanForward.siblings` merges: each layer's q/k/v, and its gate/up."""
    layers = model.model.layers
    return ([[l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj] for l in layers]
            + [[l.mlp.gate_proj, l.mlp.up_proj] for l in layers])


@pytest.fixture
def merging(monkeypatch):
    """Either backend merging its groups whatever the dtype (it merges only where that measured faster)."""
    choose = cpu_linear._choose
    monkeypatch.setattr(cpu_linear, "_choose", lambda *a: dataclasses.replace(choose(*a), merges=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_merged_siblings_give_their_own_columns_and_unpack_exactly(arch, backend, merging):
    """q/k/v and gate/up packed as one layer each: every layer's columns are, in float32, the bits it gives
    packed alone, from the group's one call and from the layer called alone; no weight is held twice;
    unpacking gives every weight back exactly."""
    model, alone = _model(arch), _model(arch)
    plain = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    assert cpu_linear.install(alone, backend) == cpu_linear.install(model, backend, merge=_siblings(model)) == len(plain)
    assert cpu_linear.install(model, backend, merge=_siblings(model)) == 0  # once only
    with torch.inference_mode():
        for group, singles in zip(_siblings(model), _siblings(alone)):
            one = cpu_linear.merged(group[0])
            assert one is not None and all(cpu_linear.merged(m) is None for m in group[1:])
            assert getattr(one, cpu_linear.PACKED).is_mkldnn == (backend == "onednn")
            outs = cpu_linear.siblings(group, x)
            for layer, single, out in zip(group, singles, outs):
                want = single(x)
                assert torch.equal(out, want) and torch.equal(layer(x), want)
                assert layer.weight.numel() == 0 and cpu_linear.is_packed(layer)
                assert cpu_linear.weight_numel(layer) == cpu_linear.weight_numel(single)
            assert cpu_linear.siblings(group[:2], x)[0].shape == (5, group[0].out_features)  # not the whole group: each alone
    assert torch.equal(_logits(model, ids), _logits(alone, ids))

    cpu_linear.unpack(model)
    for name, layer in _linears(model).items():
        assert torch.equal(layer.weight, plain[name]), name
        assert not cpu_linear.is_packed(layer) and "forward" not in vars(layer)


def test_groups_are_merged_where_that_measured_faster(backend):
    """oneDNN's native bfloat16: merged; float32, widened bfloat16 and the AVX2 kernel: each layer apart."""
    for dtype in (torch.float32, torch.bfloat16):
        model = _model("llama").to(dtype)
        cpu_linear.install(model, backend, merge=_siblings(model))
        native = backend == "onednn" and dtype == torch.bfloat16 and not cpu_linear._native_problem(dtype)
        assert all((cpu_linear.merged(group[0]) is not None) == native for group in _siblings(model))


def test_layers_that_cannot_be_one_are_packed_each_alone(backend, merging):
    """A group whose layers differ in input features or in having a bias is not merged."""
    model = _model("llama")
    layer = model.model.layers[0]
    layer.self_attn.k_proj.bias = torch.nn.Parameter(torch.zeros(layer.self_attn.k_proj.out_features))
    groups = [[layer.self_attn.q_proj, layer.self_attn.k_proj], [layer.mlp.gate_proj, layer.mlp.down_proj]]
    assert cpu_linear.install(model, backend, merge=groups) == len(_linears(model))
    assert not any(cpu_linear.merged(m) for m in _linears(model).values())
    assert all(hasattr(m, cpu_linear.PACKED) for m in _linears(model).values())


@pytest.fixture(params=[torch.bfloat16, torch.float32])
def onednn_rows(request, cpu_kernels_built) -> torch.dtype:
    """`onednn_rows`: our kernel for a layer's few rows, on the bytes oneDNN packed (AVX-512 CPUs; bfloat16 also
    AVX512-BF16), in each dtype."""
    dtype = request.param
    if not (torch.cpu._is_avx512_bf16_supported() if dtype == torch.bfloat16 else torch.cpu._is_avx512_supported()):
        pytest.skip(f"this CPU has no AVX-512{' BF16' if dtype == torch.bfloat16 else ''}")
    if cpu_linear.unavailable("onednn", dtype) or cpu_linear._native_problem(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} natively here")
    return dtype


@pytest.mark.parametrize("out_features, in_features", [(37, 300), (64, 64), (50, 33), (3, 7), (1024, 512)])
def test_few_rows_run_on_onednns_bytes_in_place(onednn_rows, out_features, in_features):
    """Up to ONEDNN_ROWS rows of a layer packed by oneDNN run on our kernel, reading oneDNN's bytes (no second
    copy): each output its float32 sum (bfloat16: rounded once, so nearly always oneDNN's own bits; the sums'
    order differs), each row's the same alone or beside others. More rows, or none, go to oneDNN."""
    dtype = onednn_rows
    most = cpu_linear.ONEDNN_ROWS[dtype]
    generator = torch.Generator().manual_seed(out_features)
    layer = torch.nn.Linear(in_features, out_features).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        layer.bias.copy_(torch.randn(out_features, generator=generator))
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = torch.nn.Sequential(layer)
    assert cpu_linear.install(model, "onednn") == 1 and getattr(layer, cpu_linear.ROWS) == most
    packed, ops = getattr(layer, cpu_linear.PACKED), torch.ops.softprompt
    assert ops.onednn_layout(packed, weight) and not ops.onednn_layout(packed, weight.flip(0))
    onednn = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # noqa: E731
    x = torch.randn(most + 1, in_features, generator=generator).to(dtype)
    with torch.inference_mode():
        for rows in range(1, most + 1):
            got = layer(x[:rows])
            exact = torch.nn.functional.linear(x[:rows].double(), weight.double(), bias.double())
            assert torch.equal(got, ops.onednn_rows(x[:rows], packed, bias))
            if dtype == torch.bfloat16:
                torch.testing.assert_close(got.double(), exact, atol=1e-3, rtol=2 ** -8)  # one rounding to bfloat16
                assert (got != onednn(x[:rows])).float().mean() < 0.02
            else:
                torch.testing.assert_close(got.double(), exact, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(got, onednn(x[:rows]), atol=1e-4, rtol=1e-5)
            for r in range(rows):
                assert torch.equal(got[r], layer(x[r:r + 1])[0])
        assert torch.equal(layer(x), onednn(x))  # more rows: oneDNN's own call
        assert layer(x[:0]).shape == (0, out_features)  # none: oneDNN's too
        with pytest.raises(RuntimeError, match="rows <="):
            ops.onednn_rows(x, packed, bias)
        with pytest.raises(RuntimeError, match="float32 x expected"):
            ops.onednn_rows(x[:1].double(), packed, bias)
    cpu_linear.unpack(model)
    assert torch.equal(layer.weight, weight) and not hasattr(layer, cpu_linear.ROWS)


def test_bfloat16_is_packed_natively_or_widened_to_float32(backend):
    """The kernel keeps bfloat16 weights and oneDNN packs them natively where it can; elsewhere oneDNN
    packs them as float32. Each output is rounded back to bfloat16."""
    model = _model("llama").to(torch.bfloat16)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    plain = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    assert cpu_linear.install(model, backend) == len(plain)
    native = backend == "avx2" or cpu_linear._probe(cpu_linear._onednn(torch.bfloat16), torch.bfloat16) == ""
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


@pytest.mark.parametrize("out_features", [1, 16, 17, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_linear_at_every_row_count(avx2_kernel, out_features, bias):
    """Every register tile (1-6 rows), several chunks of rows, a partly filled last block."""
    generator = torch.Generator().manual_seed(out_features)
    layer = torch.nn.Linear(67, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(generator=generator)
    packed = cpu_linear._block(layer.weight.detach())
    assert packed.shape == (-(-out_features // cpu_linear.BLOCK), 67, cpu_linear.BLOCK)
    assert torch.equal(cpu_linear._plain(packed, out_features), layer.weight)
    for rows in [*range(0, 14), 47, 48, 49, 97, 300]:
        x = torch.randn(rows, 67, generator=generator)
        got = cpu_kernels.ops().packed_linear(x, packed, layer.bias, out_features)
        torch.testing.assert_close(got, layer(x).detach(), atol=2e-5, rtol=2e-5, msg=f"{rows} rows")
        # bfloat16 weights, widened as they are loaded: float32's result on the rounded weights
        rounded = layer.weight.detach().bfloat16()
        got = cpu_kernels.ops().packed_linear(x, cpu_linear._block(rounded), layer.bias, out_features)
        want = torch.nn.functional.linear(x, rounded.float(), layer.bias)
        torch.testing.assert_close(got, want.detach(), atol=2e-5, rtol=2e-5, msg=f"{rows} rows, bfloat16")


def test_kernel_output_does_not_depend_on_how_the_work_is_shared(avx2_kernel):
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


def test_kernel_refuses_what_it_cannot_compute(avx2_kernel):
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


def test_auto_takes_the_avx2_kernel_only_where_avx2_is_the_best_unit():
    model = _model("llama")
    cpu_linear.install(model)
    on_kernel = cpu_linear.kernel_weight(model.lm_head) is not None
    assert on_kernel == (torch.backends.cpu.get_cpu_capability() == "AVX2" and not cpu_linear.unavailable("avx2"))
    assert cpu_linear.describe(model).startswith("the AVX2 kernel" if on_kernel else "oneDNN")


def test_switching_backends_repacks_from_the_exact_weights(backend):
    """Packed for one backend, then another, then none: the same logits each time, the plain weights back."""
    model = _model("qwen2")
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    plain = {name: m.weight.detach().clone() for name, m in _linears(model).items()}
    other = "onednn" if backend == "avx2" else "avx2"
    for choice in (other, backend):
        if choice == "avx2" and cpu_linear.unavailable("avx2"):
            continue
        assert cpu_linear.install(model, choice) == len(plain)
        assert cpu_linear.describe(model).startswith("oneDNN" if choice == "onednn" else "the AVX2 kernel")
        torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    assert cpu_linear.install(model, "torch") == 0
    assert cpu_linear.describe(model) == "torch (plain F.linear)"
    for name, layer in _linears(model).items():
        assert torch.equal(layer.weight, plain[name]) and "forward" not in vars(layer), name


def test_a_backend_forced_where_it_cannot_run_is_refused(monkeypatch):
    model = _model("llama")
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: False)
    with pytest.raises(ValueError, match="AVX2 linear kernel cannot run here: this CPU has no AVX2"):
        cpu_linear.install(model, "avx2")
    with pytest.raises(ValueError, match="unknown linear backend"):
        cpu_linear.install(model, "mkl")
    assert all(not hasattr(layer, cpu_linear.PACKED) for layer in _linears(model).values())


def test_a_packing_that_loses_values_is_refused(avx2_kernel, monkeypatch):
    """Packing frees the plain weight, so `install` checks it can be given back exactly first."""
    block = cpu_linear._block

    def lossy(weight):
        packed = block(weight)
        packed[0, -1, 0] += 1.0  # one value of the first block wrong
        return packed

    monkeypatch.setattr(cpu_linear, "_block", lossy)
    monkeypatch.setattr(cpu_linear, "_probe", lambda backend, dtype: "")
    with pytest.raises(RuntimeError, match="lost values"):
        cpu_linear.install(_model("llama"), "avx2")


def test_bfloat16_without_a_native_gemm_is_widened_on_onednn(monkeypatch):
    """Where the CPU has neither AVX512-BF16 nor AMX, oneDNN's bfloat16 GEMM is emulated: bfloat16
    weights are packed widened to float32 instead (the choice probes the native packing, not the widened)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this build of torch has no oneDNN")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    chosen = cpu_linear._choose(torch.bfloat16, "onednn")
    assert chosen.compute == torch.float32 and chosen.name == "oneDNN"
    assert cpu_linear.unavailable("onednn", torch.bfloat16) == ""  # widened, it serves
    assert cpu_linear._choose(torch.float32, "onednn").compute == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_takes_rows_padded_to_the_counts_it_has_built_for(dtype, cpu_kernels_built):
    """More rows than `onednn_rows` takes go to oneDNN (bfloat16: padded, csrc/forward.cpp's `padded_rows`,
    so a new row count reuses a primitive): each row's result is oneDNN's own (float32: to the last bit;
    bfloat16: AMX's blocking may move a last bit with the row count), in x's shape, whatever its leading
    dimensions."""
    if dtype == torch.bfloat16 and cpu_linear.unavailable("onednn", dtype):
        pytest.skip("no native bfloat16 GEMM here")
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    small = cpu_linear.ONEDNN_ROWS[dtype]
    for rows in (1, small, small + 1, 63, 65, 200, 1025, 1100):  # bucket edges: 8s to 64, 16s to 256, 64s, 128s
        x = torch.randn(rows, 24, generator=g).to(dtype)
        want = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        for shaped in (x, x.view(1, rows, 24), x.t().contiguous().t()):  # 3-D, and rows strided
            got = torch.ops.softprompt.onednn_linear(shaped, packed, bias, small)
            assert got.shape == (*shaped.shape[:-1], 40)
            if dtype == torch.float32 and rows > small:  # (onednn_rows sums in an order of its own)
                assert torch.equal(got.reshape(rows, 40), want)
            torch.testing.assert_close(got.reshape(rows, 40), want, atol=1e-3, rtol=2 ** -7)


def test_onednns_caches_are_sized_by_the_models_dtype(monkeypatch):
    """bfloat16 on a native bfloat16 GEMM pads its rows, so its shapes are bounded and its caps higher;
    a cap the operator set stays."""
    for variable in cpu_linear.CACHE_VARIABLES:
        monkeypatch.setenv(variable, "32")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cpu_linear.size_caches(torch.bfloat16)
    want = cpu_linear.CACHE_CAPACITY["padded" if native else "unpadded"]
    assert all(os.environ[v] == str(want) for v in cpu_linear.CACHE_VARIABLES)
    cpu_linear.size_caches(torch.float32)
    assert all(os.environ[v] == str(cpu_linear.CACHE_CAPACITY["unpadded"]) for v in cpu_linear.CACHE_VARIABLES)
    monkeypatch.setattr(cpu_linear, "_SET_BY_OPERATOR", frozenset(cpu_linear.CACHE_VARIABLES))
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    cpu_linear.size_caches(torch.bfloat16)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
