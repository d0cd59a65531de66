"""adapters.inline: the inline soft-prompt decoders refuse what they must from the header (or the
archive's directory and pickle) alone, before the data is decoded or anything densifies, and
return the embeddings as sent otherwise; `inline_adapter` equals a prompt-tuning adapter's prefix."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import save

from adapters.inline import InvalidSoftPrompt, decode_safetensors, decode_torch_save

HIDDEN, MAX_TOKENS, MAX_BYTES = 64, 512, 4 * 1024 * 1024


def st(tensors: dict) -> str:
    return base64.b64encode(save(tensors)).decode()


def ts(obj) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def header_only(header: dict, body: bytes = b"") -> str:
    raw = json.dumps(header).encode()
    return base64.b64encode(struct.pack("<Q", len(raw)) + raw + body).decode()


def refused(decode, payload: str, *mentions: str) -> str:
    with pytest.raises(InvalidSoftPrompt) as info:
        decode(payload, HIDDEN, MAX_TOKENS, MAX_BYTES)
    for m in mentions:
        assert m in str(info.value), f"{info.value!r} does not name {m!r}"
    return str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safetensors_round_trip(dtype):
    t = torch.randn(5, HIDDEN).to(dtype)
    got = decode_safetensors(st({"embeddings": t}), HIDDEN, MAX_TOKENS, MAX_BYTES)
    assert got.dtype == dtype and torch.equal(got, t)


@pytest.mark.parametrize("payload, mentions", [
    (lambda: st({"e": torch.zeros(3, HIDDEN + 1)}), ["width 65", "hidden size is 64"]),
    (lambda: st({"e": torch.tensor([[float("nan")] * HIDDEN])}), ["NaN"]),
    (lambda: st({"e": torch.tensor([[float("inf")] * HIDDEN])}), ["infinite"]),
    (lambda: st({"a": torch.zeros(2, HIDDEN), "b": torch.zeros(2, HIDDEN)}), ["exactly one tensor", "2"]),
    (lambda: st({"e": torch.zeros(2, 2, HIDDEN)}), ["2-D"]),
    (lambda: st({"e": torch.zeros(HIDDEN)}), ["2-D"]),
    (lambda: st({"e": torch.zeros(2, HIDDEN, dtype=torch.int64)}), ["I64"]),
    (lambda: st({"e": torch.zeros(2, HIDDEN, dtype=torch.float64)}), ["F64"]),
    (lambda: st({"e": torch.zeros(0, HIDDEN)}), ["0 virtual tokens"]),
    (lambda: st({"e": torch.zeros(MAX_TOKENS + 1, HIDDEN)}), ["513 virtual tokens", "--max-virtual-tokens"]),
    (lambda: "not base64 at all!", ["base64"]),
    (lambda: base64.b64encode(b"\x01\x02").decode(), ["safetensors"]),
    (lambda: base64.b64encode(b"PK\x03\x04" + b"\0" * 40).decode(), ["safetensors"]),
    (lambda: header_only(["a list"]), ["JSON object"]),
    (lambda: base64.b64encode(struct.pack("<Q", 5) + b"{oops").decode(), ["not JSON"]),
    (lambda: header_only({"e": {"dtype": "F32", "shape": [2, HIDDEN], "data_offsets": [0, 8]}}, b"\0" * 8),
     ["data_offsets"]),
    (lambda: header_only({"e": {"dtype": "F32", "shape": [2, HIDDEN], "data_offsets": [0, 2 * HIDDEN * 4]}},
                         b"\0" * 16), ["truncated"]),
    (lambda: header_only({"e": {"dtype": "F32", "shape": [1, HIDDEN], "data_offsets": [0, HIDDEN * 4]}},
                         b"\0" * (HIDDEN * 4 + 12)), ["declares", "holds"]),
])
def test_safetensors_refusals(payload, mentions):
    refused(decode_safetensors, payload(), *mentions)


def test_a_huge_declared_shape_is_refused_from_the_header_fast_and_small():
    """1 GB declared (and 1 TB): refused before any data is decoded; no big allocation."""
    for rows in (2**30 // (4 * HIDDEN), 2**40 // (4 * HIDDEN)):
        payload = header_only({"e": {"dtype": "F32", "shape": [rows, HIDDEN], "data_offsets": [0, rows * HIDDEN * 4]}},
                              b"\0" * 64)
        tracemalloc.start()
        started = time.perf_counter()
        refused(decode_safetensors, payload, "virtual tokens")
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert elapsed < 0.1 and peak < 1 << 20
    # within the token limit but past the byte limit: the size, from the header too
    payload = header_only({"e": {"dtype": "F32", "shape": [MAX_TOKENS, HIDDEN], "data_offsets": [0, 1]}})
    with pytest.raises(InvalidSoftPrompt, match="--max-request-bytes"):
        decode_safetensors(payload, HIDDEN, MAX_TOKENS, 1024)


def test_a_header_length_past_the_bound_is_refused():
    refused(decode_safetensors, base64.b64encode(struct.pack("<Q", 2**40) + b"{}").decode(), "header declares")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_save_round_trip(dtype):
    t = torch.randn(4, HIDDEN).to(dtype)
    got = decode_torch_save(ts(t), HIDDEN, MAX_TOKENS, MAX_BYTES)
    assert got.dtype == dtype and torch.equal(got, t)


def test_torch_save_of_a_slice_is_served_as_the_slice():
    t = torch.randn(8, HIDDEN)
    assert torch.equal(decode_torch_save(ts(t[2:5]), HIDDEN, MAX_TOKENS, MAX_BYTES), t[2:5])


@pytest.mark.parametrize("payload, mentions", [
    (lambda: ts(torch.randn(3, HIDDEN).to_sparse()), ["sparse"]),
    (lambda: ts(torch.randn(3, HIDDEN).to_sparse_csr()), ["sparse"]),
    (lambda: ts(torch.zeros(MAX_TOKENS + 1, HIDDEN)), ["513 virtual tokens"]),
    (lambda: ts(torch.zeros(3, HIDDEN + 1)), ["hidden size is 64"]),
    (lambda: ts(torch.zeros(1, 3, HIDDEN)), ["2-D"]),
    (lambda: ts(torch.zeros(3, HIDDEN, dtype=torch.float64)), ["DoubleStorage"]),
    (lambda: ts(torch.zeros(3, HIDDEN, dtype=torch.int32)), ["IntStorage"]),
    (lambda: ts(torch.full((3, HIDDEN), float("nan"))), ["NaN"]),
    (lambda: ts({"e": torch.zeros(3, HIDDEN)}), ["one dense tensor"]),
    (lambda: ts(torch.nn.Parameter(torch.zeros(3, HIDDEN))), ["_rebuild_parameter"]),
    (lambda: st({"e": torch.zeros(3, HIDDEN)}), ["zip"]),
    (lambda: "%%%", ["base64"]),
])
def test_torch_save_refusals(payload, mentions):
    refused(decode_torch_save, payload(), *mentions)


def test_torch_save_past_the_byte_limit_is_refused_before_loading():
    payload = ts(torch.zeros(100, HIDDEN))
    with pytest.raises(InvalidSoftPrompt, match="--max-request-bytes"):
        decode_torch_save(payload, HIDDEN, MAX_TOKENS, 1024)


def test_torch_save_sparse_bomb_never_densifies(monkeypatch):
    """CVE-2025-62164's shape: a small payload declaring a huge sparse tensor. Refused from the
    pickle's globals, before torch.load runs at all."""
    bomb = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), (2**31, HIDDEN))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    refused(decode_torch_save, ts(bomb), "sparse")


def test_torch_save_compressed_entry_refused():
    import zipfile

    raw = base64.b64decode(ts(torch.zeros(2, HIDDEN)))
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    refused(decode_torch_save, base64.b64encode(out.getvalue()).decode(), "compressed")


def test_inline_adapter_is_the_prompt_tuning_prefix(tmp_path):
    """The request's prefix is what the registry materializes for the same embeddings."""
    from transformers import AutoModelForCausalLM

    from adapters import ModelSpec
    from adapters.adapter import virtual_tokens_to_kv
    from adapters.inline import inline_adapter
    from server.demo.tiny import save_tiny_model

    save_tiny_model(tmp_path / "llama", "llama", seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    spec = ModelSpec.from_hf_config(model.config, torch.device("cpu"), torch.float32)
    e = torch.randn(4, spec.hidden_size).to(torch.bfloat16)  # sent in bf16: served in the model's dtype
    adapter = inline_adapter(e, spec, model)
    assert torch.equal(adapter.kv, virtual_tokens_to_kv(model, e.float()))
    assert adapter.prefix_length == 4 and adapter.version.startswith("inline-")
    assert adapter.kv.shape == (spec.num_layers, 2, spec.num_kv_heads, 4, spec.head_dim)


def test_prompts_arriving_together_share_one_forward(tmp_path):
    """InlinePrefixes: what waits when a round runs goes through one forward per length; each gets its
    own prefix (as its own forward would give it), and a bad payload fails its request alone."""
    import threading

    from transformers import AutoModelForCausalLM

    from adapters import ModelSpec
    from adapters.adapter import virtual_tokens_to_kv
    from adapters.inline import InlinePrefixes
    from server.demo.tiny import save_tiny_model

    save_tiny_model(tmp_path / "llama", "llama", seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    spec = ModelSpec.from_hf_config(model.config, torch.device("cpu"), torch.float32)
    forwards, rounds, gate = [], [], threading.Event()
    original = model.forward

    def counted(*args, **kwargs):
        forwards.append(kwargs["inputs_embeds"].shape[:2])
        return original(*args, **kwargs)

    model.forward = counted

    def run_model(fn):  # the engine thread: holds the round until every request has queued
        gate.wait(10)
        rounds.append(1)
        fn()

    prefixes = InlinePrefixes(spec, model, run_model)
    tables = [torch.randn(n, spec.hidden_size) for n in (4, 4, 4, 2)]

    def bad():
        raise InvalidSoftPrompt("bad payload")

    results: dict[int, object] = {}

    def request(i, decode):
        try:
            results[i] = prefixes.get(decode)
        except InvalidSoftPrompt as exc:
            results[i] = exc

    threads = [threading.Thread(target=request, args=(i, (lambda t=t: t))) for i, t in enumerate(tables)]
    threads.append(threading.Thread(target=request, args=(len(tables), bad)))
    for t in threads:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(rounds) == 1 and sorted(tuple(s) for s in forwards) == [(1, 2), (3, 4)]
    assert isinstance(results[len(tables)], InvalidSoftPrompt)
    for i, t in enumerate(tables):
        torch.testing.assert_close(results[i].kv, virtual_tokens_to_kv(model, t), rtol=1e-5, atol=1e-5)
        assert results[i].prefix_length == t.shape[0]


def test_get_async_serves_a_burst_in_one_round_and_skips_a_request_gone():
    """From the event loop: no worker thread per request; a request cancelled while waiting is
    skipped (its payload never decoded) and the others are served."""
    import asyncio
    import threading

    from adapters.inline import InlinePrefixes

    gate, decoded, rounds = threading.Event(), [], []

    def run_model(fn):
        gate.wait(10)
        rounds.append(1)
        fn()

    prefixes = InlinePrefixes(None, None, run_model)
    import adapters.inline as inline_module

    def fake_adapters(tables, spec, model):
        return [f"adapter-{t.shape[0]}" for t in tables]

    original, inline_module.inline_adapters = inline_module.inline_adapters, fake_adapters
    try:
        async def burst():
            def decode(i):
                return lambda: decoded.append(i) or torch.zeros(i + 1, 2)

            tasks = [asyncio.ensure_future(prefixes.get_async(decode(i))) for i in range(100)]
            await asyncio.sleep(0.1)
            tasks[0].cancel()
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.gather(*tasks[1:])

        results = asyncio.run(burst())
    finally:
        inline_module.inline_adapters = original
    assert results == [f"adapter-{i + 1}" for i in range(1, 100)]
    assert len(rounds) == 1 and 0 not in decoded
