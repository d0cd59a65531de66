"""Soft prompts sent with a request instead of uploaded: decoded without trusting the payload,
and served as a KV prefix held by that request alone.

Two encodings of one tensor of virtual-token embeddings [n, hidden] (float32, bfloat16, float16):
- `decode_safetensors` (our `soft_prompt`): base64 of a safetensors file. Its 8-byte length and
  JSON header are read and checked here, bounded, before the tensor data is decoded: exactly one
  tensor, its dtype, shape (width = the model's hidden size, 1 <= n <= max_tokens) and data
  offsets consistent with the payload, its size within max_bytes. No pickle anywhere.
- `decode_torch_save` (vLLM's `prompt_embeds`): base64 of `torch.save(tensor)`, a zip archive
  around a pickle. vLLM's loader had two advisories (GHSA-rh4j-5rhw-hr54; CVE-2025-62164, a tiny
  payload declaring a sparse tensor that densifies to terabytes). Before `torch.load` runs: the
  archive's entries must be stored uncompressed and sum to at most max_bytes, and every global
  the pickle names must be one of a dense tensor's (a sparse or other layout is refused by name);
  then `torch.load(weights_only=True)`, and the same checks on the tensor as above.

Both return the embeddings on the CPU as sent; `InlinePrefixes` materializes them (the model's
forward, where model work runs: the engine thread between steps), those of requests arriving
together in one forward, each into an `Adapter` that no registry holds: it lives as long as the
request that holds it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import pickletools
import struct
import threading
import time
import zipfile
from concurrent.futures import Future, InvalidStateError
from typing import Callable

import torch

from .adapter import Adapter, virtual_tokens_to_kv
from .spec import ModelSpec

NAME = "inline"  # the adapter name such a request reports (logs, metrics)
PEFT_TYPE = "PROMPT_TUNING"  # what it is served as: virtual-token embeddings before the prompt
MAX_HEADER_BYTES = 64 * 1024  # a one-tensor safetensors header is about 100 bytes
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
# The globals a pickled dense tensor of those dtypes names (torch.save of a tensor); anything else
# (torch._utils._rebuild_sparse_tensor, torch.Size, nn.Parameter, ...) is refused before loading.
_DENSE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
    ("torch", "FloatStorage"), ("torch", "BFloat16Storage"), ("torch", "HalfStorage"),
}
MAX_PICKLE_BYTES = 64 * 1024  # a pickled tensor's data.pkl is about 150 bytes
FORWARD_TOKENS = 4096  # virtual tokens materialized in one forward at most (its activations and logits)


class InvalidSoftPrompt(ValueError):
    """The payload is not a soft prompt this server serves; the message says what is wrong."""


def decode_safetensors(text: str, hidden: int, max_tokens: int, max_bytes: int) -> torch.Tensor:
    """The embeddings [n, hidden] of a base64 safetensors payload, checked (module docstring)."""
    if not isinstance(text, str) or not text:
        raise InvalidSoftPrompt("must be a non-empty base64 string (of a safetensors file)")
    head = _b64(text[: _b64_chars(8)])[:8]
    if len(head) < 8:
        raise InvalidSoftPrompt("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES:
        raise InvalidSoftPrompt(f"not a safetensors file, or not a soft prompt: its header declares {header_len} "
                                f"bytes, more than the {MAX_HEADER_BYTES} a one-tensor header needs")
    start = 8 + header_len
    header_raw = _b64(text[: _b64_chars(start)])[8:start]
    if len(header_raw) < header_len:
        raise InvalidSoftPrompt(f"truncated: its header declares {header_len} bytes, the payload holds fewer")
    try:
        header = json.loads(header_raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidSoftPrompt("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidSoftPrompt("not a safetensors file: its header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        raise InvalidSoftPrompt(f"must hold exactly one tensor [n, {hidden}], holds {len(tensors)}"
                                + (f" ({', '.join(sorted(map(repr, tensors))[:4])})" if tensors else ""))
    (key, entry), = tensors.items()
    if not isinstance(entry, dict):
        raise InvalidSoftPrompt(f"tensor {key!r}: its header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise InvalidSoftPrompt(f"tensor {key!r} has dtype {dtype!r}; use F32, BF16 or F16")
    _check_shape(shape, hidden, max_tokens, f"tensor {key!r}")
    nbytes = shape[0] * shape[1] * _ITEMSIZE[dtype]
    if nbytes > max_bytes:
        raise InvalidSoftPrompt(f"tensor {key!r} is {nbytes} bytes, more than the {max_bytes} allowed "
                                "(--max-request-bytes)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or offsets[0] != 0 or offsets[1] != nbytes):
        raise InvalidSoftPrompt(f"tensor {key!r}: data_offsets {offsets!r} do not match its shape and dtype "
                                f"(expected [0, {nbytes}])")
    expected = start + nbytes
    holds = len(text) * 3 // 4 - text[-2:].count("=")  # the decoded length of well-formed base64
    if holds != expected:  # before the data is decoded
        raise InvalidSoftPrompt(f"the header declares {expected} bytes, the payload holds {holds}"
                                + (" (truncated)" if holds < expected else ""))
    raw = _b64(text)
    if len(raw) != expected:
        raise InvalidSoftPrompt(f"the header declares {expected} bytes, the payload holds {len(raw)}"
                                + (" (truncated)" if len(raw) < expected else ""))
    from safetensors.torch import load as load_safetensors

    try:
        tensor = load_safetensors(raw)[key]
    except Exception as exc:  # safetensors' own checks: never reached by what passed the ones above, so far
        raise InvalidSoftPrompt(f"not a valid safetensors file: {exc}") from None
    return _check_values(tensor, f"tensor {key!r}")


def decode_torch_save(text: str, hidden: int, max_tokens: int, max_bytes: int) -> torch.Tensor:
    """The embeddings [n, hidden] of vLLM's base64 `torch.save` payload, checked (module docstring)."""
    if not isinstance(text, str) or not text:
        raise InvalidSoftPrompt("must be a non-empty base64 string (of torch.save of a tensor)")
    if len(text) * 3 // 4 > max_bytes + 2:
        raise InvalidSoftPrompt(f"about {len(text) * 3 // 4} bytes, more than the {max_bytes} allowed "
                                "(--max-request-bytes)")
    raw = _b64(text)
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError):
        raise InvalidSoftPrompt("not a torch.save file (a zip archive); the legacy format is not accepted") from None
    declared = 0
    for info in entries:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise InvalidSoftPrompt(f"archive entry {info.filename!r} is compressed; torch.save stores them as is")
        declared += info.file_size
    if declared > len(raw) or declared > max_bytes:
        raise InvalidSoftPrompt(f"its archive entries declare {declared} bytes, more than the payload's "
                                f"{len(raw)} or the {max_bytes} allowed (--max-request-bytes)")
    pickles = [info for info in entries if info.filename.endswith("/data.pkl") or info.filename == "data.pkl"]
    if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
        raise InvalidSoftPrompt("not a torch.save file of one tensor (no data.pkl, several, or a large one)")
    try:
        _check_globals(archive.read(pickles[0]))
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidSoftPrompt(f"a damaged archive: {exc}") from None
    try:
        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidSoftPrompt(f"torch.load (weights_only) refused it: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise InvalidSoftPrompt(f"must be one dense tensor, got {getattr(tensor, 'layout', type(tensor).__name__)}")
    if tensor.dtype not in DTYPES.values():
        raise InvalidSoftPrompt(f"has dtype {tensor.dtype}; use float32, bfloat16 or float16")
    _check_shape(list(tensor.shape), hidden, max_tokens, "the tensor")
    return _check_values(tensor.contiguous(), "the tensor")


def inline_adapter(embeddings: torch.Tensor, spec: ModelSpec, model) -> Adapter:
    """The request's own adapter: `embeddings` [n, hidden] run through the frozen model once (a
    forward: on the engine thread, between steps), as a prompt-tuning adapter is materialized."""
    return inline_adapters([embeddings], spec, model)[0]


def inline_adapters(embeddings: list[torch.Tensor], spec: ModelSpec, model) -> list[Adapter]:
    """One adapter per tensor [n, hidden], all of one length n, in one forward per FORWARD_TOKENS."""
    n = embeddings[0].shape[0]
    per_forward = max(1, FORWARD_TOKENS // n)
    adapters = []
    for start in range(0, len(embeddings), per_forward):
        chunk = embeddings[start:start + per_forward]
        rows = torch.stack([e.to(spec.device, spec.dtype) for e in chunk])  # [b, n, hidden]
        kv = virtual_tokens_to_kv(model, rows)  # [b, layers, 2, kv_heads, n, head_dim]
        for e, row in zip(chunk, kv):
            # its dtype too: the engine shares one KV prefix between requests of one version (Adapter.prefix_key)
            digest = hashlib.sha256(str(e.dtype).encode() + e.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            adapters.append(Adapter(NAME, PEFT_TYPE, n, NAME, time.time(), {"peft_type": PEFT_TYPE,
                                    "num_virtual_tokens": n}, row.clone(), None, f"{NAME}-{digest[:16]}"))
    return adapters


class InlinePrefixes:
    """Materializes the soft prompts of requests that arrive together in one forward per length:
    each payload decoded and checked alone, then every prompt of length n waiting at that moment run
    through the model at once (`run_model`: where model work runs, the engine's `run_between_steps`,
    as for the registry's loads). 64 requests with 20 virtual tokens each: one forward of [64, 20],
    not 64 forwards of [1, 20]. Each request gets its own Adapter; nothing is kept here."""

    def __init__(self, spec: ModelSpec, model, run_model: Callable[[Callable[[], None]], None] | None = None):
        self.spec, self.model = spec, model
        self._run = run_model or (lambda fn: fn())
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[[], torch.Tensor], Future]] = []
        self._scheduled = False  # a round is queued that has not taken the pending ones yet

    def get(self, decode: Callable[[], torch.Tensor]) -> Adapter:
        """The adapter of `decode()`'s embeddings [n, hidden] (or the error it raises, InvalidSoftPrompt).
        `decode` runs where the forward does (it makes tensors: torch's threads stay the engine's).
        Blocks the calling thread (a worker, never the event loop) until its round has run."""
        future, schedule = self._queue(decode)
        if schedule:
            self._run(self._round)
        return future.result()

    async def get_async(self, decode: Callable[[], torch.Tensor]) -> Adapter:
        """`get` from an event loop: awaits the request's round, with one worker thread per round (it
        waits for the engine thread) rather than one per request, so a burst of requests is not held
        back by the worker pool's size and its soft prompts go through in one round."""
        future, schedule = self._queue(decode)
        if schedule:
            asyncio.get_running_loop().run_in_executor(None, self._run, self._round)
        return await asyncio.wrap_future(future)

    def _queue(self, decode: Callable[[], torch.Tensor]) -> tuple[Future, bool]:
        """The request's future, and whether the caller must have a round run (none is queued)."""
        future: Future = Future()
        with self._lock:
            self._pending.append((decode, future))
            schedule, self._scheduled = not self._scheduled, True
        return future, schedule

    def _round(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        try:
            self._materialize(pending)
        finally:  # whatever went wrong, nobody waits for ever
            for _, future in pending:
                _settle(future, error=RuntimeError("the soft prompt's materialization did not run"))

    def _materialize(self, pending: list[tuple[Callable[[], torch.Tensor], Future]]) -> None:
        by_length: dict[int, list[tuple[torch.Tensor, Future]]] = {}
        for decode, future in pending:
            if future.cancelled():  # its request has gone
                continue
            try:
                embeddings = decode()
            except BaseException as exc:  # this request's payload alone
                _settle(future, error=exc)
            else:
                by_length.setdefault(embeddings.shape[0], []).append((embeddings, future))
        for group in by_length.values():
            try:
                adapters = inline_adapters([e for e, _ in group], self.spec, self.model)
            except BaseException as exc:
                for _, future in group:
                    _settle(future, error=exc)
            else:
                for adapter, (_, future) in zip(adapters, group):
                    _settle(future, adapter)


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Its result or error, unless it is done already (cancelled: the request went away meanwhile)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def _check_shape(shape, hidden: int, max_tokens: int, what: str) -> None:
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(d) for d in shape):
        raise InvalidSoftPrompt(f"{what} has shape {shape!r}; a soft prompt is 2-D: [n, {hidden}]")
    n, width = shape
    if width != hidden:
        raise InvalidSoftPrompt(f"{what} has width {width}; this model's hidden size is {hidden}")
    if not 1 <= n <= max_tokens:
        raise InvalidSoftPrompt(f"{what} has {n} virtual tokens; 1 to {max_tokens} are allowed "
                                "(--max-virtual-tokens)")


def _check_values(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise InvalidSoftPrompt(f"{what} holds NaN or infinite values")
    return tensor


def _check_globals(pickle_raw: bytes) -> None:
    """Every global the pickle names is one of a dense tensor's; read with pickletools, never run."""
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(pickle_raw):
            if op.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
            elif op.name == "STACK_GLOBAL":
                module, name = (strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?")
            else:
                if isinstance(arg, str):
                    strings.append(arg)
                continue
            if (module, name) not in _DENSE_GLOBALS:
                kind = "a sparse tensor" if "sparse" in name else f"{module}.{name}"
                raise InvalidSoftPrompt(f"holds {kind}; only one dense tensor (float32, bfloat16 or float16) "
                                        "is accepted")
    except (ValueError, IndexError, struct.error) as exc:
        if isinstance(exc, InvalidSoftPrompt):
            raise
        raise InvalidSoftPrompt(f"its pickle is malformed: {exc}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _b64_chars(n: int) -> int:
    """Base64 characters that hold the first n bytes."""
    return -(-n // 3) * 4


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSoftPrompt("not base64") from None
