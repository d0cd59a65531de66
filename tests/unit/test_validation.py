"""Every way an upload can be wrong raises InvalidAdapter naming the problem, and leaves nothing
registered and nothing stored."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    InvalidAdapter,
    check_name,
    read_adapter_dir,
)
from tests.factory import trained_peft

GOOD_NAME = "my-adapter_1.v2"


def _assert_nothing_added(registry, store):
    assert len(registry) == 0
    assert registry.names() == []
    assert store.names() == []
    assert list(store.root.iterdir()) == [], "the store holds leftovers after a failed upload"


def _rejects(store_registry, config, weights, *needles, name=GOOD_NAME):
    """registry.add(name, ...) raises InvalidAdapter whose message holds every needle; nothing changes."""
    registry, store = store_registry
    config_raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    weights_raw = weights if isinstance(weights, bytes) else save_safetensors(weights)
    with pytest.raises(InvalidAdapter) as info:
        registry.add(name, config_raw, weights_raw)
    message = str(info.value)
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"
    assert name not in registry
    _assert_nothing_added(registry, store)
    return message


def _tensors(llama, variant) -> dict[str, torch.Tensor]:
    return load_safetensors(llama.files(variant)[1])


@pytest.fixture(scope="module")
def foreign(worlds, tmp_path_factory):
    """PEFT adapters saved for tiny llamas whose sizes differ from the standard one (lazy)."""
    root = tmp_path_factory.mktemp("foreign")
    models = {
        "hidden32": dict(hidden_size=32),  # hidden 32 (kv dim 16)
        "layers3": dict(num_layers=3),  # 3 layers, same widths
        "kvheads1": dict(num_attention_heads=2, num_key_value_heads=1),  # 1 kv head of 32: same kv dim, 32
    }
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str, variant: str) -> Path:
        if (model, variant) not in cache:
            model_dir = worlds.other_model(model, **models[model])
            out = root / f"{model}-{variant}"
            trained_peft(model_dir, variant).save_pretrained(out)
            cache[model, variant] = out
        return cache[model, variant]

    return get


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((path / CONFIG_FILE).read_text()), load_safetensors((path / WEIGHTS_FILE).read_bytes())


# --- config ---------------------------------------------------------------------------------------


def test_good_adapter_is_accepted_and_stored(store_registry, llama):
    """The control: the same registry and store accept a good upload."""
    registry, store = store_registry
    adapter = registry.add(GOOD_NAME, *llama.files("prompt"))
    assert registry.get(GOOD_NAME) is adapter
    assert store.names() == [GOOD_NAME]


def test_unknown_peft_type(store_registry, llama):
    config = llama.config("prompt") | {"peft_type": "LORA"}
    message = _rejects(store_registry, config, _tensors(llama, "prompt"), "LORA")
    for supported in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        assert supported in message


def test_missing_peft_type(store_registry, llama):
    config = llama.config("prompt")
    del config["peft_type"]
    _rejects(store_registry, config, _tensors(llama, "prompt"), "peft_type")


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "SEQ_2_SEQ_LM", None])
def test_unsupported_task_type(store_registry, llama, task_type):
    config = llama.config("prefix") | {"task_type": task_type}
    _rejects(store_registry, config, _tensors(llama, "prefix"), "task_type", str(task_type), "CAUSAL_LM")


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b""])
def test_config_not_json(store_registry, llama, raw):
    _rejects(store_registry, raw, _tensors(llama, "prompt"), CONFIG_FILE, "JSON")


def test_config_not_an_object(store_registry, llama):
    _rejects(store_registry, b"[1, 2, 3]", _tensors(llama, "prompt"), CONFIG_FILE, "object")


@pytest.mark.parametrize("value", [0, -3, "5", 2.5, True, None])
def test_bad_num_virtual_tokens(store_registry, llama, value):
    config = llama.config("prompt") | {"num_virtual_tokens": value}
    _rejects(store_registry, config, _tensors(llama, "prompt"), "num_virtual_tokens")


# --- files ----------------------------------------------------------------------------------------


def test_missing_config_file(store_registry, llama, tmp_path):
    registry, store = store_registry
    d = tmp_path / "upload"
    d.mkdir()
    (d / WEIGHTS_FILE).write_bytes(llama.files("prompt")[1])
    with pytest.raises(InvalidAdapter, match=CONFIG_FILE):
        read_adapter_dir(d)
    with pytest.raises(InvalidAdapter, match=CONFIG_FILE):
        registry.add_dir(GOOD_NAME, d, source="upload")
    _assert_nothing_added(registry, store)


def test_missing_weights_file(store_registry, llama, tmp_path):
    registry, store = store_registry
    d = tmp_path / "upload"
    d.mkdir()
    (d / CONFIG_FILE).write_bytes(llama.files("prompt")[0])
    with pytest.raises(InvalidAdapter) as info:
        registry.add_dir(GOOD_NAME, d, source="upload")
    assert WEIGHTS_FILE in str(info.value)
    assert "pickle" not in str(info.value)
    _assert_nothing_added(registry, store)


def test_pickle_weights_are_named_and_never_loaded(store_registry, llama, tmp_path, monkeypatch):
    registry, store = store_registry
    d = tmp_path / "upload"
    d.mkdir()
    (d / CONFIG_FILE).write_bytes(llama.files("prompt")[0])
    torch.save({"prompt_embeddings": torch.zeros(5, 64)}, d / "adapter_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(InvalidAdapter) as info:
        registry.add_dir(GOOD_NAME, d, source="upload")
    message = str(info.value)
    assert WEIGHTS_FILE in message and "adapter_model.bin" in message
    assert "pickle" in message and "never loaded" in message
    _assert_nothing_added(registry, store)


def test_not_a_directory(tmp_path):
    with pytest.raises(InvalidAdapter, match="not a directory"):
        read_adapter_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("kind", ["random", "pickle", "empty", "truncated"])
def test_weights_not_safetensors(store_registry, llama, kind):
    good = llama.files("prompt")[1]
    if kind == "random":
        raw = os.urandom(4096)
    elif kind == "pickle":  # a torch .bin renamed to adapter_model.safetensors
        buf = io.BytesIO()
        torch.save({"prompt_embeddings": torch.zeros(5, 64)}, buf)
        raw = buf.getvalue()
    elif kind == "empty":
        raw = b""
    else:
        raw = good[: len(good) // 2]
    _rejects(store_registry, llama.config("prompt"), raw, WEIGHTS_FILE, "safetensors")


def test_weights_without_tensors(store_registry, llama):
    _rejects(store_registry, llama.config("prompt"), {}, WEIGHTS_FILE, "no tensors")


# --- tensors against the base model ---------------------------------------------------------------


@pytest.mark.parametrize("variant", ["prompt", "ptuning-mlp", "prefix"])
def test_adapter_for_another_hidden_size(store_registry, foreign, variant):
    """An adapter made for a model of hidden size 32 does not fit the hidden-size-64 model."""
    config, tensors = _read(foreign("hidden32", variant))
    expected = "hidden size" if variant != "prefix" else "key/value width"
    _rejects(store_registry, config, tensors, "token_dim", expected)
    # Without the sizes PEFT records in the config, the tensor's shape is caught.
    for key in ("token_dim", "num_attention_heads"):
        config.pop(key, None)
    _rejects(store_registry, config, tensors, "prompt_embeddings", "shape", str(tuple(tensors["prompt_embeddings"].shape)))


@pytest.mark.parametrize("variant", ["prefix", "prefix-proj", "prompt"])
def test_adapter_for_another_number_of_layers(store_registry, foreign, variant):
    config, tensors = _read(foreign("layers3", variant))
    assert config["num_layers"] == 3
    _rejects(store_registry, config, tensors, "num_layers=3", "number of layers", "2")
    if variant.startswith("prefix"):  # the prefix tensor's width encodes the layers
        del config["num_layers"]
        _rejects(store_registry, config, tensors, "prompt_embeddings", "shape", "(num_virtual_tokens=")


def test_prefix_for_another_number_of_kv_heads(store_registry, foreign):
    """Same key/value width (1 head of 32 vs 2 heads of 16), so only the recorded head count differs."""
    config, tensors = _read(foreign("kvheads1", "prefix"))
    assert config["num_attention_heads"] == 1 and config["token_dim"] == 32
    _rejects(store_registry, config, tensors, "num_attention_heads=1", "key/value heads", "2")


@pytest.mark.parametrize("variant", ["prompt", "prefix", "ptuning-lstm"])
def test_num_virtual_tokens_mismatch(store_registry, llama, variant):
    config = llama.config(variant)
    n = config["num_virtual_tokens"]
    config["num_virtual_tokens"] = n + 3
    message = _rejects(store_registry, config, _tensors(llama, variant), "prompt_embeddings", "num_virtual_tokens")
    assert str(n + 3) in message and str(n) in message


def test_checkpoint_num_virtual_tokens_mismatch(store_registry, llama):
    """A training checkpoint whose encoder does not fit the config (9 virtual tokens, 7 rows)."""
    ckpt = llama.checkpoint_dirs["ptuning-mlp"]
    config, tensors = _read(ckpt)
    config["num_virtual_tokens"] = 9
    _rejects(store_registry, config, tensors, WEIGHTS_FILE, "encoder")


def test_checkpoint_of_unknown_tensors(store_registry, llama):
    _rejects(store_registry, llama.config("prompt"), {"some.other.weight": torch.zeros(5, 64)},
             "prompt_embeddings", "encoder")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_dtype(store_registry, llama, dtype):
    table = _tensors(llama, "prompt")["prompt_embeddings"]
    _rejects(store_registry, llama.config("prompt"), {"prompt_embeddings": (table * 10).to(dtype)},
             "prompt_embeddings", "dtype", str(dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("variant", ["prompt", "prefix"])
def test_non_finite_values(store_registry, llama, variant, bad):
    table = _tensors(llama, variant)["prompt_embeddings"].clone()
    table[1, 3] = bad
    _rejects(store_registry, llama.config(variant), {"prompt_embeddings": table}, "prompt_embeddings", "NaN or inf")


def test_half_precision_table_is_accepted(store_registry, llama):
    """Not an error: PEFT may save fp16/bf16 tables; they are served in the model's dtype."""
    registry, _ = store_registry
    table = _tensors(llama, "prompt")["prompt_embeddings"].to(torch.bfloat16)
    adapter = registry.add(GOOD_NAME, llama.files("prompt")[0], save_safetensors({"prompt_embeddings": table}))
    assert adapter.kv.dtype == llama.spec.dtype


# --- names ----------------------------------------------------------------------------------------

BAD_NAMES = ["../x", ".hidden", "", "a" * 200, "a/b", "..", "a\\b", "with space", "-leading", "x\n", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names(store_registry, llama, name):
    with pytest.raises(InvalidAdapter, match="invalid adapter name"):
        check_name(name)
    _rejects(store_registry, *llama.files("prompt"), "invalid adapter name", name=name)


@pytest.mark.parametrize("name", [None, 5])
def test_non_string_names(name):
    with pytest.raises(InvalidAdapter, match="invalid adapter name"):
        check_name(name)


@pytest.mark.parametrize("name", ["a", "A9", "my-adapter_1.v2", "a" * 128, "x..y"])
def test_valid_names(name):
    assert check_name(name) == name


def test_name_of_129_chars_is_invalid():
    with pytest.raises(InvalidAdapter):
        check_name("a" * 129)


@pytest.mark.parametrize("peft_type", [["PROMPT_TUNING"], {"type": "PROMPT_TUNING"}, 7])
def test_peft_type_of_wrong_json_type(store_registry, llama, peft_type):
    """A list or object as peft_type is invalid input too: InvalidAdapter, not a TypeError (an HTTP 500)."""
    config = llama.config("prompt") | {"peft_type": peft_type}
    _rejects(store_registry, config, _tensors(llama, "prompt"), "peft_type")


def test_dtype_auto_picks_bfloat16_only_on_cpus_that_compute_it(monkeypatch):
    import torch

    from server import model

    cpu = torch.device("cpu")
    monkeypatch.setattr(model, "cpu_has_bf16", lambda: False)
    assert model.pick_dtype("auto", cpu)[0] == torch.float32
    monkeypatch.setattr(model, "cpu_has_bf16", lambda: True)
    dtype, why = model.pick_dtype("auto", cpu)
    assert dtype == torch.bfloat16 and "AVX512-BF16 or AMX" in why
    assert model.pick_dtype("float32", cpu) == (torch.float32, "--dtype float32")  # tests of exact PEFT parity ask for it


def test_dtype_auto_follows_the_flags_this_cpu_reports():
    """The choice on this machine, against the CPU's own flags in /proc/cpuinfo (not torch's probe)."""
    import torch

    from server import model

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith(("flags", "Features"))), []))
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert model.cpu_has_bf16() == native
    assert model.pick_dtype("auto", torch.device("cpu"))[0] == (torch.bfloat16 if native else torch.float32)
