"""Reading and validating PEFT's files, and materializing them into an `Adapter`.

Nothing here unpickles: weights are read with safetensors only. Every problem raises
`InvalidAdapter` naming the file, field or tensor at fault; nothing is registered on failure.

Nothing is allocated from what adapter_config.json declares until it is known to fit: the sizes
are capped (`Limits`) and checked against the base model, the weights file's header is read and
checked against the file's length, and the tensors it declares are compared, name by name and
shape by shape, with what the config asks for. Only then are tensors read and an encoder built,
so memory is bounded by the size of the upload, never by a number in the config.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from . import multitask_prompt_tuning, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (register the kinds)
from .adapter import Adapter, materialize
from .base import AdapterKind, config_int, kind_for
from .errors import InvalidAdapter, InvalidTask
from .spec import ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
VERSION_CHARS = 16  # hex digits of an adapter's version (64 bits of its content hash)
SUPPORTED_TASK_TYPES = ("CAUSAL_LM",)
# module names in PEFT's encoders
ENCODER_ROOTS = ("embedding", "transform", "mlp_head", "lstm_head", "prefix_task_cols", "prefix_task_rows")
MAX_HEADER_BYTES = 1 << 20  # an adapter's safetensors header is a few KB (an encoder has ~150 tensors at most)
MAX_DIMS = 8  # adapter tensors have 1 or 2
# safetensors dtype -> (torch dtype, bytes per element); only the float ones are served, the others are
# listed to name them in the error
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}


@dataclass(frozen=True)
class Limits:
    """Caps on the sizes adapter_config.json may declare, checked before anything is allocated."""

    max_virtual_tokens: int = 512  # --max-virtual-tokens
    max_encoder_hidden_size: int = 65536  # p-tuning's MLP/LSTM width, prefix tuning's projection width
    max_encoder_layers: int = 16  # p-tuning's LSTM layers


LIMITS = Limits()  # used when the caller passes none (AdapterRegistry passes the server's)


def parse_config(raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    return config


def check_config(config: dict, spec: ModelSpec, limits: Limits | None = None) -> AdapterKind:
    """The kind, task and every declared size, against the caps and the base model; allocates nothing."""
    limits = limits or LIMITS
    kind = kind_for(config.get("peft_type"))
    task_type = config.get("task_type")
    if task_type not in SUPPORTED_TASK_TYPES:
        raise InvalidAdapter(
            f"unsupported task_type {task_type!r}; supported: {', '.join(SUPPORTED_TASK_TYPES)}"
        )
    _check_cap("num_virtual_tokens", config_int(config, "num_virtual_tokens"), limits.max_virtual_tokens,
               " (--max-virtual-tokens)")
    for key, cap in (("encoder_hidden_size", limits.max_encoder_hidden_size),
                     ("encoder_num_layers", limits.max_encoder_layers)):
        if config.get(key) is not None:
            _check_cap(key, config_int(config, key), cap)
    if config_int(config, "num_transformer_submodules", default=1) != 1:
        raise InvalidAdapter(
            f"{CONFIG_FILE}: num_transformer_submodules={config['num_transformer_submodules']}: "
            "a causal LM adapter has 1"
        )
    kind.check_config(config, spec)
    return kind


def _check_cap(key: str, value: int, cap: int, flag: str = "") -> None:
    if value > cap:
        raise InvalidAdapter(f"{CONFIG_FILE}: {key}={value} is more than the {cap} this server allows{flag}")


def read_header(raw: bytes) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header alone (nothing else is read).

    The file is 8 bytes of little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}, "__metadata__": {...}}, then the tensors' bytes, back to back. Refused: a header
    that is not such JSON, a dtype that is not a float, and offsets or sizes that do not tile the
    rest of the file exactly (a truncated file, or one with bytes no tensor accounts for).
    """
    if len(raw) < 8:
        raise _bad_weights(f"{len(raw)} bytes is shorter than the 8-byte header length")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise _bad_weights(f"its header claims {header_len} bytes, more than the {MAX_HEADER_BYTES} allowed")
    if 8 + header_len > len(raw):
        raise _bad_weights(f"its header of {header_len} bytes runs past the end of the {len(raw)}-byte file")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad_weights(f"its header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad_weights(f"its header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _bad_weights("its __metadata__ must map names to strings")
    if not header:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no tensors")
    data_len = len(raw) - 8 - header_len
    shapes, spans = {}, []
    for name, entry in header.items():
        shapes[name], span = _read_entry(name, entry, data_len)
        spans.append((*span, name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise _bad_weights(f"tensor {name!r} starts at byte {begin} of the data, expected {end} (overlap or gap)")
        end = stop
    if end != data_len:
        raise _bad_weights(f"its tensors declare {end} bytes of data, but the file holds {data_len}")
    return shapes


def _read_entry(name: str, entry, data_len: int) -> tuple[tuple[int, ...], tuple[int, int]]:
    """One header entry, checked: its shape and its (begin, end) byte span within the data."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad_weights(f"header entry {name!r} must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {name!r} has dtype {dtype!r}, expected a float dtype")
    torch_dtype, itemsize = DTYPES[dtype]
    if not torch_dtype.is_floating_point:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {name!r} has dtype {torch_dtype}, expected a float dtype")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise _bad_weights(f"tensor {name!r} has shape {shape!r:.200}, not a list of at most {MAX_DIMS} sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise _bad_weights(f"tensor {name!r} has data_offsets {offsets!r:.200}, not [begin, end]")
    if offsets[1] > data_len:
        raise _bad_weights(f"tensor {name!r} ends at byte {offsets[1]} of the data, past its end ({data_len} bytes)")
    nbytes = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _bad_weights(
            f"tensor {name!r} of shape {tuple(shape)} and dtype {dtype} needs {nbytes} bytes, "
            f"its data_offsets span {offsets[1] - offsets[0]}"
        )
    return tuple(shape), (offsets[0], offsets[1])


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad_weights(problem: str) -> InvalidAdapter:
    return InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {problem}")


def check_weights(kind: AdapterKind, config: dict, shapes: dict[str, tuple[int, ...]], spec: ModelSpec) -> None:
    """The tensors a weights file declares (name -> shape, from `read_header`) are what `config` asks
    for: the saved table of this base model's width, or exactly the encoder's parameters."""
    if _holds_table(kind, shapes):
        check_table_shape(kind, config, shapes["prompt_embeddings"], spec)
    else:
        check_encoder_shapes(kind, config, shapes)


def check_table_shape(kind: AdapterKind, config: dict, shape: tuple[int, ...], spec: ModelSpec) -> None:
    n = config["num_virtual_tokens"]
    width = kind.table_width(spec)
    if tuple(shape) != (n, width):
        raise InvalidAdapter(
            f"{WEIGHTS_FILE}: prompt_embeddings has shape {tuple(shape)}, but this base model needs "
            f"(num_virtual_tokens={n}, {width}) for {kind.peft_type}"
        )


def check_encoder_shapes(kind: AdapterKind, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter of the encoder the config describes is in the file with its shape, and
    nothing else is: so the encoder's parameter count is the file's. Names the config fields at fault."""
    found: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        name = _encoder_key(key, kind)
        if name is None:
            raise InvalidAdapter(
                f"{WEIGHTS_FILE} holds neither 'prompt_embeddings' nor a {kind.peft_type} encoder's weights "
                f"(found {sorted(shapes)[:5]})"
            )
        if name in found:
            raise InvalidAdapter(f"{WEIGHTS_FILE} holds two tensors for the encoder weight {name!r}")
        found[name] = tuple(shape)
    expected = kind.encoder_shapes(config)
    missing, unexpected = [k for k in expected if k not in found], [k for k in found if k not in expected]
    if missing or unexpected:
        fields = _fields_behind(kind, config, lambda shapes: shapes.keys() != expected.keys())
        raise InvalidAdapter(
            f"{WEIGHTS_FILE}: the {kind.peft_type} encoder weights do not fit {CONFIG_FILE} ({_describe(fields)}): "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for name, shape in sorted(expected.items()):
        if found[name] != shape:
            same_rank = len(found[name]) == len(shape)
            axes = [i for i, size in enumerate(shape) if not same_rank or found[name][i] != size]
            fields = _fields_behind(kind, config, lambda shapes: any(shapes[name][i] != shape[i] for i in axes))
            raise InvalidAdapter(
                f"{WEIGHTS_FILE}: encoder weight {name!r} has shape {found[name]}, but {CONFIG_FILE} "
                f"({_describe(fields)}) asks for {shape}"
            )


def _fields_behind(kind: AdapterKind, config: dict, changes) -> dict[str, int]:
    """The encoder sizes whose value decides what `changes(shapes)` tests (found by changing each
    size by one and recomputing the shapes: integers only, nothing is built); all of them if none."""
    sizes = kind.encoder_sizes(config)
    behind = {key: value for key, value in sizes.items() if changes(kind.encoder_shapes(config | {key: value + 1}))}
    return behind or sizes


def _describe(fields: dict[str, int]) -> str:
    return ", ".join(f"{key}={value}" for key, value in fields.items())


def parse_weights(raw: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its header checked (`read_header`) before any is read."""
    read_header(raw)
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise _bad_weights(str(exc)) from None
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {key!r} holds NaN or infinite values")
    return tensors


def read_table(kind: AdapterKind, config: dict, tensors: dict[str, torch.Tensor], spec: ModelSpec,
               task: int | None = None) -> torch.Tensor:
    """The materialized table [num_virtual_tokens, width]: as saved, or run through the checkpoint's
    encoder (for `task`, of a kind with tasks: `check_task` first)."""
    if _holds_table(kind, tensors):
        table = tensors["prompt_embeddings"]
    else:
        table = _run_encoder(kind, config, tensors, task)
    check_table_shape(kind, config, tuple(table.shape), spec)
    return table.float()


def _holds_table(kind: AdapterKind, tensors: dict) -> bool:
    """Whether the file holds the materialized table (`prompt_embeddings`, as save_pretrained writes
    it), not the encoder's weights; a kind that saves an encoder weight under that name never does."""
    return "prompt_embeddings" in tensors and "prompt_embeddings" not in kind.saved_names


def _run_encoder(kind: AdapterKind, config: dict, tensors: dict[str, torch.Tensor], task: int | None) -> torch.Tensor:
    check_encoder_shapes(kind, config, {key: tuple(value.shape) for key, value in tensors.items()})
    encoder = kind.encoder(config)  # its parameters are the file's, shape for shape
    encoder.load_state_dict({_encoder_key(key, kind): value.float() for key, value in tensors.items()}, strict=True)
    indices = torch.arange(config["num_virtual_tokens"])
    with torch.inference_mode():
        return encoder.eval()(indices) if task is None else encoder.eval()(indices, task)


def _encoder_key(key: str, kind: AdapterKind) -> str | None:
    """'base_model.prompt_encoder.default.mlp_head.0.weight' -> 'mlp_head.0.weight'; a name the kind
    saves its own way (`AdapterKind.saved_names`) -> the encoder's."""
    if key in kind.saved_names:
        return kind.saved_names[key]
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in ENCODER_ROOTS:
            return ".".join(parts[i:])
    return None


def content_version(config_raw: bytes, weights_raw: bytes) -> str:
    """An adapter's version: a hash of its two files, the same wherever and whenever they are saved.
    sha256 over the two files' own sha256 digests (config first), as hex, cut to VERSION_CHARS;
    hashing the digests keeps the boundary between the files unambiguous."""
    digests = hashlib.sha256(config_raw).digest() + hashlib.sha256(weights_raw).digest()
    return hashlib.sha256(digests).hexdigest()[:VERSION_CHARS]


def load_adapter(
    name: str, config_raw: bytes, weights_raw: bytes, spec: ModelSpec, model, source: str,
    limits: Limits | None = None, saved_kv: Callable[[str, int], torch.Tensor | None] | None = None,
    task: int | None = None,
) -> Adapter:
    """Validate PEFT's two files and materialize them for `model`. Raises InvalidAdapter, and
    InvalidTask when `task` does not fit the adapter (`check_task`).
    saved_kv(version, num_virtual_tokens): the prefix materialized before for these files (and `task`),
    if any (then no encoder and no model forward run; the adapter has no embeddings)."""
    config = parse_config(config_raw)
    kind = check_config(config, spec, limits)
    check_weights(kind, config, read_header(weights_raw), spec)
    check_task(name, kind, config, task)
    version = content_version(config_raw, weights_raw)
    kv = saved_kv(version, config["num_virtual_tokens"]) if saved_kv else None
    embeddings = None
    if kv is None:
        table = read_table(kind, config, parse_weights(weights_raw), spec, task)
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
        version=version,
        task=task,
    )


def check_task(name: str, kind: AdapterKind, config: dict, task: int | None) -> None:
    """A task is named exactly when the kind has tasks, and is one of them. Raises InvalidTask."""
    tasks = kind.tasks(config)
    if tasks is None:
        if task is not None:
            raise InvalidTask(f"adapter {name!r} is a {kind.peft_type} adapter, which has no tasks; "
                              f"got {task!r} (leave it out)")
        return
    if task is None:
        raise InvalidTask(f"adapter {name!r} is a {kind.peft_type} adapter with {tasks} tasks: "
                          f"name one, 0 to {tasks - 1}")
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < tasks:
        raise InvalidTask(f"{task!r} is not a task of adapter {name!r}, which has {tasks}: 0 to {tasks - 1}")


def first_task(config_raw: bytes) -> int | None:
    """The task an upload of these files is validated and materialized with: 0 for a kind with
    tasks, else None (also for a config that fails: loading it says why)."""
    try:
        config = parse_config(config_raw)
        return None if kind_for(config.get("peft_type")).tasks(config) is None else 0
    except InvalidAdapter:
        return None


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
