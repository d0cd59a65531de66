"""Reading and validating PEFT's files, and materializing them into an `Adapter`.

Nothing here unpickles: weights are read with safetensors only. Every problem raises
`InvalidAdapter` naming the file, field or tensor at fault; nothing is registered on failure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from . import p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (register the kinds)
from .adapter import Adapter, materialize
from .base import AdapterKind, config_int, kind_for
from .errors import InvalidAdapter
from .spec import ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
SUPPORTED_TASK_TYPES = ("CAUSAL_LM",)
MAX_VIRTUAL_TOKENS = 4096
ENCODER_ROOTS = ("embedding", "transform", "mlp_head", "lstm_head")  # module names in PEFT's encoders


def parse_config(raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    return config


def parse_weights(raw: bytes) -> dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    if not tensors:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no tensors")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {key!r} has dtype {tensor.dtype}, expected a float dtype")
        if not torch.isfinite(tensor).all():
            raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {key!r} holds NaN or infinite values")
    return tensors


def check_config(config: dict, spec: ModelSpec) -> AdapterKind:
    kind = kind_for(config.get("peft_type"))
    task_type = config.get("task_type")
    if task_type not in SUPPORTED_TASK_TYPES:
        raise InvalidAdapter(
            f"unsupported task_type {task_type!r}; supported: {', '.join(SUPPORTED_TASK_TYPES)}"
        )
    n = config_int(config, "num_virtual_tokens")
    if n > MAX_VIRTUAL_TOKENS:
        raise InvalidAdapter(f"num_virtual_tokens={n} is more than the {MAX_VIRTUAL_TOKENS} supported")
    if config.get("num_transformer_submodules", 1) != 1:
        raise InvalidAdapter(
            f"num_transformer_submodules={config['num_transformer_submodules']}: a causal LM adapter has 1"
        )
    kind.check_config(config, spec)
    return kind


def read_table(kind: AdapterKind, config: dict, tensors: dict[str, torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """The materialized table [num_virtual_tokens, width]: as saved, or run through the checkpoint's encoder."""
    n = config["num_virtual_tokens"]
    if "prompt_embeddings" in tensors:
        table = tensors["prompt_embeddings"]
    else:
        table = _run_encoder(kind, config, tensors)
    width = kind.table_width(spec)
    if tuple(table.shape) != (n, width):
        raise InvalidAdapter(
            f"{WEIGHTS_FILE}: prompt_embeddings has shape {tuple(table.shape)}, but this base model needs "
            f"(num_virtual_tokens={n}, {width}) for {kind.peft_type}"
        )
    return table.float()


def _run_encoder(kind: AdapterKind, config: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    state = {_encoder_key(key): value for key, value in tensors.items()}
    if None in state:
        raise InvalidAdapter(
            f"{WEIGHTS_FILE} holds neither 'prompt_embeddings' nor a {kind.peft_type} encoder's weights "
            f"(found {sorted(tensors)[:5]})"
        )
    encoder = kind.encoder(config)
    try:
        encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: encoder weights do not fit adapter_config.json: {exc}") from None
    with torch.inference_mode():
        return encoder.eval()(torch.arange(config["num_virtual_tokens"]))


def _encoder_key(key: str) -> str | None:
    """'base_model.prompt_encoder.default.mlp_head.0.weight' -> 'mlp_head.0.weight'."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in ENCODER_ROOTS:
            return ".".join(parts[i:])
    return None


def load_adapter(
    name: str, config_raw: bytes, weights_raw: bytes, spec: ModelSpec, model, source: str
) -> Adapter:
    """Validate PEFT's two files and materialize them for `model`. Raises InvalidAdapter."""
    config = parse_config(config_raw)
    kind = check_config(config, spec)
    table = read_table(kind, config, parse_weights(weights_raw), spec)
    kv, embeddings = materialize(kind, table, spec, model)
    return Adapter(
        name=name,
        peft_type=kind.peft_type,
        num_virtual_tokens=config["num_virtual_tokens"],
        source=source,
        created_at=time.time(),
        config=config,
        kv=kv,
        embeddings=embeddings,
    )


def read_adapter_dir(path: Path) -> tuple[bytes, bytes]:
    """The raw bytes of PEFT's two files in `path`, with a clear error for what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidAdapter(f"{path} is not a directory")
    if not (path / CONFIG_FILE).is_file():
        raise InvalidAdapter(f"{path} has no {CONFIG_FILE}")
    if not (path / WEIGHTS_FILE).is_file():
        pickled = [f for f in PICKLE_FILES if (path / f).exists()]
        hint = f" ({pickled[0]} is a pickle and is never loaded; re-save with safe_serialization=True)" if pickled else ""
        raise InvalidAdapter(f"{path} has no {WEIGHTS_FILE}{hint}")
    return (path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()
