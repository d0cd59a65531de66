"""The written-out forward (`lean_forward`) computes exactly what transformers' forward computes
on the same packed steps, for every class it takes; other models keep transformers' forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters import Adapter, ModelSpec
from adapters.adapter import virtual_tokens_to_kv
from server.demo.tiny import seeded_init, tiny_config
from server.engine.cpu import attention as cpu_attention, linear as cpu_linear, rowwise
from server.engine.fast_path import FastPaths
from server.engine.lean_forward import LeanForward
from server.engine.model_runner import ModelRunner, ScheduledStep
from server.engine.request import SamplingParams, Sequence

VARIANTS = {
    "llama": dict(),
    "qwen2": dict(),  # biases on q/k/v, lm_head tied to the embeddings
    "qwen2-sliding": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),  # one full layer, one windowed
    "mistral": dict(sliding_window=5),
}


def _model(variant: str):
    arch = variant.split("-")[0]
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden_size=64, num_layers=2, **VARIANTS[variant]))
    seeded_init(model, seed=3)
    return model.eval()


def _packed_steps(model, lean: ModelRunner, plain: ModelRunner) -> None:
    """Both runners run the same prefill (a prefix-carrying request and a plain one, prompts longer
    than the window) and three decodes: the logits are equal to the last bit."""
    g = torch.Generator().manual_seed(0)
    prefix = virtual_tokens_to_kv(model, model.get_input_embeddings()(torch.randint(3, 200, (4,), generator=g)))
    adapter = Adapter("p", "PROMPT_TUNING", 4, "p", 0.0, {}, prefix, None)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (9, 3)]
    seqs = {runner: [Sequence(list(prompts[0]), SamplingParams(max_new_tokens=8), adapter),
                     Sequence(list(prompts[1]), SamplingParams(max_new_tokens=8))] for runner in (lean, plain)}
    for step in range(4):
        logits = {}
        for runner, batch in seqs.items():
            scheduled = ScheduledStep(prefill=[(s, s.pending) for s in batch]) if step == 0 else ScheduledStep(decode=batch)
            _, logits[runner] = runner.forward(scheduled)
        assert torch.equal(logits[lean], logits[plain]), f"step {step}"
        for batch in seqs.values():
            for seq, row in zip(batch, logits[lean]):
                seq.output_ids.append(int(row.argmax()))
    assert len({tuple(s.output_ids) for s in seqs[lean]}) == 2  # the requests did differ


@pytest.mark.parametrize("variant", VARIANTS)
def test_lean_forward_equals_transformers_on_packed_steps(variant):
    """One runner lean, one through transformers, on one model: the same logits to the last bit."""
    model = _model(variant)
    spec = ModelSpec.from_hf_config(model.config, torch.device("cpu"), torch.float32)
    lean, plain = (ModelRunner(model, spec, kv_cache_bytes=1 << 20) for _ in range(2))
    assert lean.lean is not None
    plain.lean = None
    _packed_steps(model, lean, plain)


@pytest.mark.parametrize("isa", ["auto", "avx2"])  # avx2: attention and row-wise passes as on CPUs without AVX-512
@pytest.mark.parametrize("backend", ["avx2", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_steps_in_one_call_equal_the_layers_in_python(variant, dtype, backend, isa, cpu_kernels_built):
    """Each step's layers in one C++ call (`NativeDecode`; the prefill's where the attention kernel's prompt
    rows pay, the decoding steps' everywhere), taken wherever the linear layers
    run on packed weights (each backend forced here: the AVX2 kernel runs on any CPU with AVX2, oneDNN
    wherever torch has it, in bfloat16 natively or widened to float32), give the logits the Python
    layers give, to the last bit."""
    problem = cpu_linear.unavailable(backend, dtype)
    if problem:
        pytest.skip(f"--cpu-linear {backend} cannot run here: {problem}")
    model = _model(variant).to(dtype)
    spec = ModelSpec.from_hf_config(model.config, torch.device("cpu"), dtype)
    native, python = (ModelRunner(model, spec, kv_cache_bytes=1 << 20, paths=FastPaths(linear=backend,
                                                                                      native_decode=mode))
                      for mode in ("on", "off"))
    assert python.lean.native is None
    assert native.describe()["native_decode"] and native.describe()["linear"] == cpu_linear.describe(model)
    if backend == "onednn":
        assert all(w is None or w.is_mkldnn for w in native.lean.native.weights[1:9:2])  # q, k, v, o: oneDNN's
    calls = []
    native.lean.native = _Counted(native.lean.native, calls)
    with cpu_attention.isa(isa), rowwise.isa("avx2" if isa == "avx2" else "auto"):
        _packed_steps(model, native, python)
        # the prefill too where the attention kernel takes prompt rows (its AVX-512 code), then three decoding steps
        assert len(calls) == 3 + cpu_attention.prefill_pays()


def test_the_one_call_on_onednn_widened_bfloat16_equals_the_layers_in_python(monkeypatch, cpu_kernels_built):
    """Where oneDNN has no native bfloat16 GEMM, bfloat16 weights are packed widened to float32 (forced here):
    the one call widens each layer's input and bias and rounds its output back, as `_onednn_forward` does."""
    if cpu_linear.unavailable("onednn", torch.float32):
        pytest.skip(f"--cpu-linear onednn cannot run here: {cpu_linear.unavailable('onednn', torch.float32)}")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # a CPU without native bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model = _model("qwen2").to(torch.bfloat16)  # q/k/v biases: widened too
    spec = ModelSpec.from_hf_config(model.config, torch.device("cpu"), torch.bfloat16)
    native, python = (ModelRunner(model, spec, kv_cache_bytes=1 << 20, paths=FastPaths(linear="onednn",
                                                                                      native_decode=mode))
                      for mode in ("on", "off"))
    assert cpu_linear.describe(model) == "oneDNN (float32)"
    calls = []
    native.lean.native = _Counted(native.lean.native, calls)
    _packed_steps(model, native, python)
    assert len(calls) == 3 + cpu_attention.prefill_pays()


class _Counted:
    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def takes(self, ragged, h):
        return self.inner.takes(ragged, h)

    def __call__(self, *args):
        self.calls.append(1)
        return self.inner(*args)


def test_the_one_call_is_not_taken_for_other_activations():
    model = _model("llama")
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    spec = ModelSpec.from_hf_config(model.config, torch.device("cpu"), torch.float32)
    assert ModelRunner(model, spec, kv_cache_bytes=1 << 20).lean.native is None
    if not cpu_linear.unavailable("avx2"):
        assert ModelRunner(model, spec, 1 << 20, paths=FastPaths(linear="avx2")).lean.native is None
        with pytest.raises(ValueError, match="activation is GELU, not SiLU"):
            ModelRunner(model, spec, 1 << 20, paths=FastPaths(linear="avx2", native_decode="on"))


def test_only_the_classes_written_out_are_taken():
    assert LeanForward.supports(_model("llama"))
    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2", hidden_size=64, num_layers=2))
    assert not LeanForward.supports(gpt2)
    with_norms = _model("llama")
    for layer in with_norms.model.layers:  # per-head q/k norms, as Qwen3 has: not what the lean forward computes
        layer.self_attn.q_norm = torch.nn.Identity()
    assert not LeanForward.supports(with_norms)
