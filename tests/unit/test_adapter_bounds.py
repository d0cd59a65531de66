"""A 1 KB adapter_config.json cannot make the server allocate: every declared size is capped and
checked against the base model and the weights file's header before anything is built, and the
header itself is checked against the file. Refusals are InvalidAdapter naming the field, fast,
with resident memory unchanged."""

from __future__ import annotations

import json
import re
import resource
import struct
import time
import warnings

import psutil
import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType
from peft.tuners.p_tuning.model import PromptEncoder as PeftPromptEncoder
from peft.tuners.prefix_tuning.model import PrefixEncoder as PeftPrefixEncoder
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters import KINDS, WEIGHTS_FILE, InvalidAdapter
from adapters.loading import LIMITS, Limits, load_adapter, read_header
from server.config import Config
from tests.factory import VARIANTS

NAME = "bounded"
HUGE = 1_000_000_000
MAX_SECONDS = 1.0
MAX_GROWTH = 8 * 1024 * 1024  # bytes of resident memory a refusal may add (noise; a real allocation is GBs)
SIZE_FIELDS = ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "encoder_hidden_size",
               "encoder_num_layers", "num_transformer_submodules")


def _files(llama, variant: str, checkpoint: bool) -> tuple[dict, bytes]:
    """The config and weights of `variant`: as save_pretrained wrote them, or as a training checkpoint."""
    d = (llama.checkpoint_dirs if checkpoint else llama.adapter_dirs)[variant]
    return json.loads((d / "adapter_config.json").read_text()), (d / WEIGHTS_FILE).read_bytes()


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _refused(store_registry, config: dict | bytes, weights: bytes, *needles: str) -> str:
    """registry.add refuses the files with InvalidAdapter naming every needle, in under a second, with
    the resident set (now and at its peak) grown by less than MAX_GROWTH; nothing is registered or stored."""
    registry, store = store_registry
    config_raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    process = psutil.Process()
    rss, peak = process.memory_info().rss, _max_rss()
    start = time.perf_counter()
    with pytest.raises(InvalidAdapter) as info:
        registry.add(NAME, config_raw, weights)
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"refused after {elapsed:.2f} s"
    assert process.memory_info().rss - rss < MAX_GROWTH
    assert _max_rss() - peak < MAX_GROWTH, "the peak resident set grew while refusing"
    message = str(info.value)
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"
    assert NAME not in registry and store.names() == []
    return message


# --- fields over their caps or beyond the base model: refused before the weights are looked at ---------

OVER_CAP = [  # (variant, checkpoint, field, value)
    ("ptuning-mlp", True, "encoder_hidden_size", HUGE),
    ("ptuning-mlp", False, "encoder_hidden_size", HUGE),
    ("ptuning-lstm", True, "encoder_hidden_size", HUGE),
    ("prefix-proj", True, "encoder_hidden_size", HUGE),
    ("ptuning-lstm", True, "encoder_hidden_size", LIMITS.max_encoder_hidden_size + 1),
    ("ptuning-lstm", True, "encoder_num_layers", HUGE),
    ("ptuning-lstm", True, "encoder_num_layers", LIMITS.max_encoder_layers + 1),
    ("prompt", False, "num_virtual_tokens", HUGE),
    ("prompt", True, "num_virtual_tokens", HUGE),
    ("prefix", True, "num_virtual_tokens", LIMITS.max_virtual_tokens + 1),
    ("ptuning-mlp", True, "num_virtual_tokens", HUGE),
    ("prompt", True, "token_dim", HUGE),
    ("prefix", True, "token_dim", HUGE),
    ("ptuning-mlp", True, "token_dim", 32),
    ("prefix", True, "num_layers", HUGE),
    ("prompt", False, "num_layers", 3),
    ("prompt", False, "num_attention_heads", HUGE),
    ("prompt", False, "num_attention_heads", 3),  # not a multiple of the 2 key/value heads
    ("prefix", True, "num_attention_heads", HUGE),
    ("prefix", False, "num_attention_heads", 4),  # prefix tuning records the key/value heads
    ("prompt", True, "num_transformer_submodules", HUGE),
    ("prefix", False, "num_transformer_submodules", 2),
]


@pytest.mark.parametrize("variant,checkpoint,field,value", OVER_CAP)
def test_declared_size_over_cap_or_base_model_is_refused(store_registry, llama, variant, checkpoint, field, value):
    config, weights = _files(llama, variant, checkpoint)
    _refused(store_registry, config | {field: value}, weights, f"{field}={value}")


@pytest.mark.parametrize("field", SIZE_FIELDS)
@pytest.mark.parametrize("value", [-1, 0, "64", 2.0, True, [64]])
def test_declared_size_of_wrong_type_is_refused(store_registry, llama, field, value):
    config, weights = _files(llama, "ptuning-lstm", checkpoint=True)
    _refused(store_registry, config | {field: value}, weights, field)


def test_a_billion_wide_encoder_is_refused_at_once(store_registry, llama):
    """The report's case: a p-tuning checkpoint whose 1 KB config asks for an MLP 10^9 wide."""
    config, weights = _files(llama, "ptuning-mlp", checkpoint=True)
    config["encoder_hidden_size"] = 1_000_000_000
    assert len(json.dumps(config)) < 1024
    _refused(store_registry, config, weights, "encoder_hidden_size=1000000000")


UNCAPPED = [("ptuning-mlp", "encoder_hidden_size"), ("ptuning-lstm", "encoder_hidden_size"),
            ("prefix-proj", "encoder_hidden_size"), ("ptuning-lstm", "encoder_num_layers"), ("prompt", "num_virtual_tokens")]


@pytest.mark.parametrize("variant,field", UNCAPPED)
def test_without_caps_the_header_still_refuses_before_building(llama, variant, field):
    """Even under caps large enough to let the config through, the encoder is never built: its
    parameter shapes, computed from the config, disagree with the file's header."""
    config, weights = _files(llama, variant, checkpoint=True)
    config[field] = 100 if field == "encoder_num_layers" else HUGE  # layers: its shapes are listed, one per layer
    no_caps = Limits(max_virtual_tokens=10**12, max_encoder_hidden_size=10**12, max_encoder_layers=10**12)
    rss, start = psutil.Process().memory_info().rss, time.perf_counter()
    with pytest.raises(InvalidAdapter) as info:
        load_adapter(NAME, json.dumps(config).encode(), weights, llama.spec, llama.model, "test", limits=no_caps)
    assert time.perf_counter() - start < MAX_SECONDS
    assert psutil.Process().memory_info().rss - rss < MAX_GROWTH
    assert f"{field}={config[field]}" in str(info.value)


# --- a config that asks for more (or other) than the file holds ------------------------------------

MISFIT = [  # (variant, checkpoint, changes, the field the error must name)
    ("ptuning-mlp", True, {"encoder_hidden_size": 64}, "encoder_hidden_size=64"),
    ("ptuning-mlp", True, {"encoder_hidden_size": 16}, "encoder_hidden_size=16"),
    ("ptuning-lstm", True, {"encoder_hidden_size": 48}, "encoder_hidden_size=48"),
    ("ptuning-lstm", True, {"encoder_num_layers": 3}, "encoder_num_layers=3"),
    ("ptuning-lstm", True, {"encoder_num_layers": 1}, "encoder_num_layers=1"),
    ("ptuning-lstm", True, {"encoder_num_layers": LIMITS.max_encoder_layers}, "encoder_num_layers=16"),
    ("prefix-proj", True, {"encoder_hidden_size": LIMITS.max_encoder_hidden_size}, "encoder_hidden_size=65536"),
    ("ptuning-mlp", True, {"num_virtual_tokens": 9}, "num_virtual_tokens=9"),
    ("ptuning-lstm", True, {"num_virtual_tokens": LIMITS.max_virtual_tokens}, "num_virtual_tokens=512"),
    ("prefix", True, {"num_virtual_tokens": LIMITS.max_virtual_tokens}, "num_virtual_tokens=512"),
    ("prompt", True, {"num_virtual_tokens": 6}, "num_virtual_tokens=6"),
    ("prompt", False, {"num_virtual_tokens": LIMITS.max_virtual_tokens}, "num_virtual_tokens=512"),
    ("prefix-proj", False, {"num_virtual_tokens": 4}, "num_virtual_tokens=4"),
    ("ptuning-mlp", True, {"encoder_reparameterization_type": "LSTM"}, "lstm_head"),
    ("prefix-proj", True, {"prefix_projection": False}, "transform"),
]


@pytest.mark.parametrize("variant,checkpoint,changes,needle", MISFIT)
def test_config_asking_for_more_than_the_file_is_refused(store_registry, llama, variant, checkpoint, changes, needle):
    config, weights = _files(llama, variant, checkpoint)
    message = _refused(store_registry, config | changes, weights, WEIGHTS_FILE, needle)
    if "=" in needle:  # the field at fault is named, not every size of the encoder
        others = [f for f in SIZE_FIELDS if re.search(rf"\b{f}=", message) and not needle.startswith(f)]
        assert others == [], message


def test_two_tensors_for_one_encoder_weight_are_refused(store_registry, llama):
    config, weights = _files(llama, "prompt", checkpoint=True)
    ((key, table),) = load_safetensors(weights).items()
    doubled = save_safetensors({key: table, "other." + key: table.clone()})
    _refused(store_registry, config, doubled, "two tensors", "embedding.weight")


# --- the safetensors header -------------------------------------------------------------------------


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data: bytes, header_len: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def _edit(raw: bytes, **entry) -> bytes:
    """The file with the (only) tensor's header entry changed."""
    header, data = _split(raw)
    (name,) = [k for k in header if k != "__metadata__"]
    header[name] = header[name] | entry
    return _join(header, data)


def _corruptions(raw: bytes) -> dict[str, bytes]:
    header, data = _split(raw)
    (name,) = [k for k in header if k != "__metadata__"]
    rows, width = header[name]["shape"]
    begin, end = header[name]["data_offsets"]
    text = json.dumps(header).encode()
    return {
        "truncated by one byte": raw[:-1],
        "truncated to half": raw[: len(raw) // 2],
        "header only": raw[: 8 + len(text)],
        "shorter than the length": raw[:5],
        "trailing bytes": raw + b"\0" * 64,
        "header length past the end": _join(text, data, header_len=len(raw)),
        "header length of 2^63": _join(text, data, header_len=2**63),
        "header length zero": _join(b"", data),
        "header not JSON": _join(b"{" + b"x" * (len(text) - 1), data),
        "header not UTF-8": _join(b"\xff" * len(text), data),
        "header a list": _join(b"[" + b" " * (len(text) - 2) + b"]", data),
        "header deeply nested": _join(b"[" * 100_000, data),
        "a billion rows declared": _edit(raw, shape=[HUGE, width]),
        "shape larger than the data": _edit(raw, shape=[rows + 1, width]),
        "negative size": _edit(raw, shape=[-rows, -width]),
        "size not an integer": _edit(raw, shape=[float(rows), width]),
        "shape not a list": _edit(raw, shape="big"),
        "40,000 dimensions": _edit(raw, shape=[2**62] * 40_000),  # under the header cap
        "offsets past the end": _edit(raw, data_offsets=[begin + 1024, end + 1024]),
        "offsets reversed": _edit(raw, data_offsets=[end, begin]),
        "offsets of three": _edit(raw, data_offsets=[begin, end, end]),
        "offsets huge": _edit(raw, data_offsets=[0, 2**70]),
        "unknown dtype": _edit(raw, dtype="F128"),
        "dtype not a string": _edit(raw, dtype=4),
        "extra entry field": _edit(raw, extra=1),
        "entry not an object": _join(header | {name: [1, 2]}, data),
        "metadata not strings": _join(header | {"__metadata__": {"format": {"nested": 1}}}, data),
        "overlapping tensors": _join(header | {"copy.embedding.weight": header[name]}, data),
        "gap before the tensor": _join(header | {name: header[name] | {"data_offsets": [8, end + 8]}},
                                       b"\0" * 8 + data),
    }


CORRUPTIONS = list(_corruptions(_join({"x": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}, b"\0" * 4)))
# (the names only: the tests corrupt the real files)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("variant,checkpoint", [("prompt", False), ("prompt", True), ("ptuning-mlp", False)])
def test_corrupt_header_is_refused(store_registry, llama, variant, checkpoint, corruption):
    config, weights = _files(llama, variant, checkpoint)  # files of one tensor: the corruptions edit it
    _refused(store_registry, config, _corruptions(weights)[corruption], WEIGHTS_FILE)


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_read_header_agrees_with_safetensors(llama, variant, checkpoint):
    """Names and shapes as safetensors' own lazy reader (header only) sees them."""
    d = (llama.checkpoint_dirs if checkpoint else llama.adapter_dirs)[variant]
    shapes = read_header((d / WEIGHTS_FILE).read_bytes())
    with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
        assert shapes == {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


# --- the encoders' shapes, as PEFT defines them ------------------------------------------------------


def _state_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _plain(peft_config) -> dict:
    """A PEFT config as adapter_config.json holds it (enums as their names)."""
    return json.loads(json.dumps(peft_config.to_dict(), default=lambda v: v.value))


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
def test_p_tuning_shapes_equal_peft_prompt_encoder(encoder_type, layers):
    peft_config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=12, encoder_hidden_size=7, encoder_num_layers=layers,
        encoder_reparameterization_type=PromptEncoderReparameterizationType(encoder_type),
        num_transformer_submodules=1, num_layers=2, num_attention_heads=2,
    )
    config = _plain(peft_config)
    kind = KINDS["P_TUNING"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that an MLP ignores encoder_num_layers
        peft_shapes = _state_shapes(PeftPromptEncoder(peft_config))
    assert kind.encoder_shapes(config) == peft_shapes == _state_shapes(kind.encoder(config))


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_shapes_equal_peft_prefix_encoder(projection):
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=12, encoder_hidden_size=7, num_layers=3,
        prefix_projection=projection, num_attention_heads=2, num_transformer_submodules=1,
    )
    config = _plain(peft_config)
    kind = KINDS["PREFIX_TUNING"]
    assert kind.encoder_shapes(config) == _state_shapes(PeftPrefixEncoder(peft_config)) == _state_shapes(
        kind.encoder(config))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_equal_the_checkpoints(llama, variant):
    config, weights = _files(llama, variant, checkpoint=True)
    prefix = "prompt_encoder.default."
    saved = {k.removeprefix(prefix): v for k, v in read_header(weights).items()}
    assert KINDS[config["peft_type"]].encoder_shapes(config) == saved


# --- what is valid still loads ----------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_valid_variant_still_loads(store_registry, llama, variant, checkpoint):
    registry, store = store_registry
    config, weights = _files(llama, variant, checkpoint)
    adapter = registry.add(NAME, json.dumps(config).encode(), weights)
    assert adapter.prefix_length == config["num_virtual_tokens"]
    assert store.names() == [NAME]
    torch.testing.assert_close(adapter.kv, llama.adapter(variant).kv, atol=1e-5, rtol=0)


def test_max_virtual_tokens_is_a_limit_of_loading(llama):
    """--max-virtual-tokens' default is loading's; a smaller limit refuses what the default allows."""
    assert Config().max_virtual_tokens == LIMITS.max_virtual_tokens == 512
    config, weights = _files(llama, "prompt", checkpoint=False)
    n = config["num_virtual_tokens"]
    raw = json.dumps(config).encode()
    with pytest.raises(InvalidAdapter, match=rf"num_virtual_tokens={n} .*--max-virtual-tokens"):
        load_adapter(NAME, raw, weights, llama.spec, llama.model, "test", limits=Limits(max_virtual_tokens=n - 1))
    adapter = load_adapter(NAME, raw, weights, llama.spec, llama.model, "test", limits=Limits(max_virtual_tokens=n))
    assert adapter.prefix_length == n
