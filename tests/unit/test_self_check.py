"""The start-up self-check: it passes on every architecture and path; its reference never goes through
a fast path; a fast path broken on purpose (a wrong bias, a dropped norm scale, a wrong multi-slice
accumulation in the linear kernel, a wrong weight in the native decode's oneDNN call) is caught, and
the engine then serves PEFT's tokens through the plain path; a broken plain forward stops the start."""

from __future__ import annotations

import time

import pytest
import torch

from server.engine import attention, lean_forward
from server.engine.cpu import kernels as cpu_kernels, linear as cpu_linear
from server.engine.fast_path import FastPaths
from server.engine.kv_cache import KVPool
from server.engine.request import SamplingParams
from server.engine.self_check import Reference, SelfCheckFailed, check_runner, verify
from tests.conftest import MAX_NEW, PROMPTS
from tests.factory import ARCHITECTURES

# the paths the faults below break: the native decode on either linear backend
NATIVE = {backend: FastPaths(linear=backend, native_decode="on") for backend in ("avx2", "onednn")}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_self_check_passes_and_leaves_the_runner_idle(worlds, arch, paths):
    runner = worlds.get(arch).engine(paths=paths).runner
    started = time.perf_counter()
    assert check_runner(runner) < 1e-4
    assert time.perf_counter() - started < 2.0
    assert runner.seqs == [] and runner.pool.held == 0
    assert runner.paths == paths


def test_the_reference_runs_on_the_plain_weights(llama):
    """Packed linears are given back plain before the reference runs: none of its forwards reaches a kernel."""
    llama.engine(paths=FastPaths(linear="onednn"))
    assert any(hasattr(m, cpu_linear.PACKED) for m in llama.model.modules())
    Reference(llama.model, llama.spec)
    assert not any(hasattr(m, cpu_linear.PACKED) for m in llama.model.modules())


def test_a_sliding_window_is_crossed(worlds, tmp_path):
    """A model with a small window gets a request whose prompt crosses it, checked like the others."""
    from server.demo.tiny import save_tiny_model
    from server.model import load_base_model

    path = save_tiny_model(tmp_path / "mistral", "mistral", sliding_window=8)
    base = load_base_model(str(path), dtype="float32")
    reference = Reference(base.model, base.spec)
    assert max(r.prompt for r in reference.requests) == 11
    from server.engine.engine import Engine

    assert Engine(base.model, base.tokenizer, base.spec, check=True).self_check["passed"]


# --- faults in the fast paths: caught, and the plain path serves ---------------------------------


def _fast_engine_with_fault(w, monkeypatch, fault, backend):
    """An engine whose self-check runs on `backend`'s paths, the native decode on, with `fault` applied to
    them alone."""
    if cpu_linear.unavailable(backend):
        pytest.skip(f"--cpu-linear {backend} cannot run here: {cpu_linear.unavailable(backend)}")
    fault(monkeypatch)
    return w.engine(paths=NATIVE[backend], check=True)


def _zeroed_biases(monkeypatch):
    """forward.cpp dropping the projections' biases: the native decode's bias slots hold zeros."""
    build = lean_forward.NativeDecode.build

    def broken(lean):
        native = build(lean)
        slots = 16  # per layer, in forward.cpp's Slot order: norm, 4 x (weight, bias), norm, 3 x (weight, bias)
        for i, weight in enumerate(native.weights):
            if i % slots in (2, 4, 6) and weight is not None:
                native.weights[i] = torch.zeros_like(weight)
        return native

    monkeypatch.setattr(lean_forward.NativeDecode, "build", staticmethod(broken))


def _unit_norms(monkeypatch):
    """forward.cpp dropping the RMS norms' scales: the native decode's norm slots hold ones."""
    build = lean_forward.NativeDecode.build

    def broken(lean):
        native = build(lean)
        for i in (0, 9):
            for layer in range(len(lean.layers)):
                native.weights[layer * 16 + i] = torch.ones_like(native.weights[layer * 16 + i])
        return native

    monkeypatch.setattr(lean_forward.NativeDecode, "build", staticmethod(broken))


def _first_slice_only(monkeypatch):
    """linear.cpp losing the partial sums of every slice after the first (kDepth = 64 input features):
    the kernel computes as if the weights past it were zero, in prefill and in the native decode."""
    ops = cpu_kernels.ops()

    def cut(packed):
        if packed is None or packed.dim() != 3 or packed.shape[1] <= 64:
            return packed
        packed = packed.clone()
        packed[:, 64:] = 0
        return packed

    class Broken:
        def packed_linear(self, x, packed, bias, out_features):
            return ops.packed_linear(x, cut(packed), bias, out_features)

        def lean_decode(self, h, cos, sin, weights, *rest):
            return ops.lean_decode(h, cos, sin, [cut(w) for w in weights], *rest)

        def __getattr__(self, name):
            return getattr(ops, name)

    monkeypatch.setattr(cpu_kernels, "ops", lambda: Broken())
    # The packing's own probe (a 300-wide layer) catches this too, before the self-check: let it pass,
    # as a fault it does not cover would (test_the_probe_catches_a_lost_slice covers the probe).
    monkeypatch.setattr(cpu_linear, "_probe", lambda backend, dtype: "")


def _scaled_onednn_weight(monkeypatch):
    """forward.cpp's oneDNN call reading a wrong weight: the native decode's down_proj weights (oneDNN
    tensors) scaled by 1.01, the Python layers' left as they are."""
    build = lean_forward.NativeDecode.build

    def broken(lean):
        native = build(lean)
        for layer in range(len(lean.layers)):
            down = native.weights[layer * 16 + 14]
            assert down.is_mkldnn
            native.weights[layer * 16 + 14] = torch.ops.mkldnn._reorder_linear_weight(down.to_dense() * 1.01)
        return native

    monkeypatch.setattr(lean_forward.NativeDecode, "build", staticmethod(broken))


def test_the_probe_catches_a_lost_slice(monkeypatch, cpu_kernels_built):
    if cpu_linear.unavailable("avx2"):
        pytest.skip(f"the AVX2 linear kernel cannot run here: {cpu_linear.unavailable('avx2')}")
    probe = cpu_linear._probe
    _first_slice_only(monkeypatch)
    assert probe(cpu_linear._kernel(torch.float32), torch.float32).startswith("off by")


@pytest.mark.parametrize("fault, backend", [
    (_zeroed_biases, "avx2"), (_unit_norms, "avx2"), (_first_slice_only, "avx2"),
    (_zeroed_biases, "onednn"), (_unit_norms, "onednn"), (_scaled_onednn_weight, "onednn")])
def test_a_broken_fast_path_is_caught_and_the_plain_path_serves(worlds, monkeypatch, fault, backend,
                                                                cpu_kernels_built):
    w = worlds.get("qwen2")  # q/k/v biases; its norms' scales and biases are drawn away from 1 and 0
    layer = w.model.model.layers[0]
    assert layer.self_attn.q_proj.bias.abs().sum() > 0 and not torch.all(layer.input_layernorm.weight == 1)
    engine = _fast_engine_with_fault(w, monkeypatch, fault, backend)
    result = engine.self_check
    assert not result["passed"] and "differ from transformers' own forward" in result["failure"]
    assert result["paths_checked"]["native_decode"]
    assert result["paths_checked"]["linear"].startswith({"avx2": "the AVX2", "onednn": "oneDNN"}[backend])
    assert result["relative_error_plain"] < 1e-4
    assert engine.runner.describe() == {"fast_path": "off", "forward": "transformers' own",
                                        "linear": "torch (plain F.linear)", "native_decode": False,
                                        "attention": "SDPA per request", "cuda_graphs": None}
    for variant in (None, "prompt", "prefix"):
        for text in PROMPTS:
            ids = w.ids(text)
            seq = engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW), w.adapter(variant))
            assert seq.output_ids == w.reference(variant, ids), f"{variant} {text!r}"


def test_the_same_faults_on_the_plain_path_stop_nothing(worlds, monkeypatch, cpu_kernels_built):
    """The plain path never calls the kernels: a broken kernel leaves its check passing."""
    _first_slice_only(monkeypatch)
    w = worlds.get("qwen2")
    assert w.engine(paths=FastPaths(enabled=False), check=True).self_check["passed"]


# --- a broken plain forward stops the start -----------------------------------------------------


@pytest.fixture
def broken_attention(monkeypatch):
    """The packed steps' attention, its output scaled: what a changed internal could do. Every forward
    the runner may use (transformers' with our attention registered, and `lean_forward`) attends
    through `attention.attend`, so the plain path is broken too; the native one-call step, whose
    attention is C++ out of this patch's reach, is kept out."""
    from server.engine.cpu.native_decode import NativeDecode

    original = attention.attend

    def broken(*args, **kwargs):
        return original(*args, **kwargs) * 0.5

    monkeypatch.setattr(attention, "attend", broken)
    monkeypatch.setattr(NativeDecode, "takes", lambda self, ragged, h: False)


def test_self_check_refuses_a_broken_attention(llama, broken_attention):
    with pytest.raises(SelfCheckFailed) as failed:
        llama.engine(check=True)
    message = str(failed.value)
    assert "LlamaForCausalLM" in message and "transformers 5." in message and "prefill" in message
    assert "'fast_path': 'off'" in message  # the plain path failed too: nothing left to serve through


def test_self_check_refuses_an_ignored_prefix(llama, monkeypatch):
    """PEFT's own failure under transformers 5.24, in the server: the prefix silently dropped."""
    monkeypatch.setattr(KVPool, "write_prefix", lambda self, seg, prefix: setattr(seg, "length", prefix.shape[3]))
    with pytest.raises(SelfCheckFailed, match="LlamaForCausalLM"):
        verify(llama.engine().runner, Reference(llama.model, llama.spec))


def test_server_refuses_to_start_with_a_broken_attention(llama, broken_attention, tmp_path):
    from server.__main__ import build_service
    from server.config import load_config

    config = load_config(["--model", str(llama.model_dir), "--adapter-dir", str(tmp_path / "store")])
    with pytest.raises(SystemExit, match="refusing to start: LlamaForCausalLM under transformers"):
        build_service(config)


def test_server_refuses_a_path_forced_where_it_cannot_run(llama, tmp_path, monkeypatch):
    from server.__main__ import build_service
    from server.config import load_config

    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: False)
    config = load_config(["--model", str(llama.model_dir), "--adapter-dir", str(tmp_path / "store"),
                          "--cpu-linear", "avx2"])
    with pytest.raises(SystemExit, match="refusing to start: the AVX2 linear kernel cannot run here: this CPU has "
                                         "no AVX2"):
        build_service(config)
