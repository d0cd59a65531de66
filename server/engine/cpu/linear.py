"""The model's linear layers on CPU, their weights packed once at start: our AVX2 kernel, or oneDNN.

`torch.nn.functional.linear` on CPU hands MKL the weight in its plain [out, in] layout at every
call. With a step's weights out of cache (any real model: the bench model alone is 92 MB), MKL's
small-batch GEMM reads them far below the memory's speed. Packed once into a layout a kernel can
stream, they are read near it. With the weights in cache the layouts are within a few percent,
which is why a hot microbenchmark shows no difference.

Two packings, one per model, chosen at `install`:
- On x86 CPUs whose best vector unit is AVX2 (`torch.backends.cpu.get_cpu_capability()`), with the
  engine's CPU kernels built (`cpu_kernels`): `csrc/linear.cpp`, computing in float32, each weight
  cut into blocks of 16 output columns stored one after another ([blocks, in, 16]), a 6 x 16 tile
  of FMAs per block, a block streamed in once with prefetching. Milliseconds for one pass through
  the bench model's 56 weights (92 MB) on the 2-core AMD EPYC here, 2 threads, in one process
  alternating, this kernel / oneDNN packed / plain F.linear: 1 row (one stream decoding)
  4.3 / 6.9 / 7.9 (memory: about 21 GB/s), 8 rows 4.0 / 8.1 / 11.3, 16 rows 6.1 / 10.7 / 15.4,
  64 rows 26.8 / 23.8 / 27.1, 1024 rows 415 / 407 / 542.
- Elsewhere (AVX-512 and AMX CPUs, whose wider units oneDNN uses; ARM; no compiler): oneDNN, the
  weight reordered into its blocked layout (what vLLM's CPU build does). oneDNN keeps each shape's
  compiled call (its primitive, with buffers sized by the rows) in two caches of 1024 entries by
  default; a step's row count changes with every arrival, so unbounded they grew a server's memory
  by half under the load test. Importing this module caps both at `CACHE_CAPACITY` (unless set in
  the environment; `size_caches` picks by the model's dtype): a step uses about 7 shapes. The caps
  are read at oneDNN's first use in the process, so they must be set before any forward runs. In
  bfloat16, building a primitive for a row
  count costs more than the product (bench model's gate/up: 1.2-1.8 ms at 100 rows against 0.2,
  8-13 ms near 2,000 against 2.5), so bfloat16 rows are padded to one of about 60 counts
  (csrc/forward.cpp's `padded_rows`): a single request's prefill step of a prompt length not seen
  before took 16.2-16.3 ms, 7.7-8.2 padded. float32 rows are not: there a new length cost nothing
  measurable (the same steps again took as long), and padding a 70-token prompt's rows to 80 did
  (17 -> 20 ms).

`install` replaces, on each `nn.Linear` of the model, the forward by the packed call and frees the
plain weight (a tied weight, such as an lm_head sharing the embedding table, is packed and kept).
`unpack` gives the plain weights back exactly: torch.compile traces plain linears.

bfloat16: the AVX2 kernel keeps the weights in bfloat16 and widens them to float32 in registers as
it loads them (exact: bfloat16 is float32's top half), computing in float32 on float32 inputs, the
output rounded back to bfloat16: the weights take bfloat16's memory and half float32's traffic.
oneDNN packs bfloat16 only on CPUs with AVX512-BF16 or AVX-NE-CONVERT; elsewhere torch's bfloat16
GEMM is emulated (the bench model ran at 144 tok/s in bfloat16 against 664 in float32), so there the
bfloat16 weights are packed widened to float32 and each layer computes in float32 (the KV cache and
activations stay bfloat16). A dtype neither can take, or a packed layer that disagrees with the
plain one on a probe, leaves every layer as it was. Where oneDNN packs bfloat16 natively it pays: on
the 2-core Xeon here (AMX, AVX512-BF16), 64 rows, torch's 1 thread, fastest of 7 runs of 200 calls,
float32 / bfloat16 in us: q_proj [512 -> 512] 209 / 45, gate_proj [512 -> 1360] 586 / 112, down_proj
[1360 -> 512] 582 / 114 (oneDNN runs bfloat16 on AMX tiles).

Layers that read the same input (a decoder layer's q/k/v projections, its MLP's gate and up) are
packed side by side as one layer when `install` is given them (`merge`; `LeanForward.siblings` names
them), where oneDNN computes bfloat16 natively: one call for the group, since oneDNN's call costs
about 16 us beyond its arithmetic (float32 groups measured 2-3% slower merged from 64 rows up, and
AVX2-kernel ones are unmeasured, so those stay apart). AMX's blocking may move a merged column's last
bfloat16 bit at some row counts. `siblings` runs a merged group as one call; a
member called alone answers with its columns, so transformers' own forward runs on a merged model.

A layer's calls of a few rows (ONEDNN_ROWS: a few decoding streams) run on a kernel of ours
(csrc/linear.cpp's `onednn_rows`: AVX512-BF16 `vdpbf16ps` pairs, float32 AVX-512 FMAs) reading the
weight oneDNN packed, in place: on AVX-512 CPUs oneDNN lays bfloat16 weights out as AB16b32a2b and
float32 ones as AB16b64a, the layouts such kernels want, so no second copy is needed. Packing checks
every byte against that layout (`onednn_layout`) and takes the kernel only where it matches. Each
output is one float32 sum (bfloat16: rounded once, as oneDNN's), in an order of its own, the same
whatever the call's other rows. Measured (bench/README.md, "Linears: merged, and a few rows on
oneDNN's bytes"): one pass over the bench model's weights at 1 row, bfloat16 1.66 -> 0.85 ms, float32
3.20 -> 2.02.

Either packing runs inside the one-call decoding step too (`native_decode.py`): csrc/forward.cpp's
`linear` computes a layer as `_kernel_forward` does, or by `onednn_linear`, the op `_onednn_forward`
calls, so the Python layers and the one call give the same bits.
"""

from __future__ import annotations

import logging
import os
import types
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from . import kernels as cpu_kernels

log = logging.getLogger(__name__)

PACKED = "_softprompt_packed"  # the attribute holding a packed layer's weight
MERGED = "_softprompt_merged"  # on a layer packed inside a merged one: (the merged layer, its first column)
ROWS = "_softprompt_rows"  # on a packed layer: the most rows `onednn_rows` takes for it (0: none)
ONEDNN_ROWS = {torch.bfloat16: 4, torch.float32: 16}  # csrc/linear.cpp's Layout::max_rows
BLOCK = 16  # output columns per block of the AVX2 kernel's packing (csrc/linear.cpp's kBlock)
# Shapes kept by oneDNN's primitive cache and by ideep's, each: where rows are padded (bfloat16 on a
# native bfloat16 GEMM) the shapes are bounded and a primitive small (236 of TinyLlama's shapes held
# 39 MiB more at 256 than at 32) and slow to build; elsewhere each holds buffers sized by its rows
# (944 of TinyLlama's float32 shapes: 1.3 GiB more at 32, 3.2 at 256).
CACHE_CAPACITY = {"padded": 256, "unpadded": 32}
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
_SET_BY_OPERATOR = frozenset(v for v in CACHE_VARIABLES if v in os.environ)
# Set on import, before anything in the process runs a oneDNN op (the self-check's reference forward
# runs before the linears are packed): oneDNN reads them once, at its first use. `size_caches` raises
# them for a bfloat16 model, before it loads.
for _variable in CACHE_VARIABLES:
    os.environ.setdefault(_variable, str(CACHE_CAPACITY["unpadded"]))


def size_caches(dtype: torch.dtype) -> None:
    """oneDNN's cache caps for a model of `dtype` (unless the operator set them): call before the process
    first runs a oneDNN op, which reads them."""
    padded = dtype == torch.bfloat16 and _native_bfloat16()
    for variable in CACHE_VARIABLES:
        if variable not in _SET_BY_OPERATOR:
            os.environ[variable] = str(CACHE_CAPACITY["padded" if padded else "unpadded"])


@dataclass(frozen=True)
class _Backend:
    name: str
    pack: Callable[[torch.Tensor], torch.Tensor]  # plain [out, in] weight -> packed
    forward: Callable  # the layer's new forward(self, x)
    compute: torch.dtype  # the packed weights' dtype
    merges: bool = False  # whether `install`'s merge groups are packed as one layer (where measured to pay)


CHOICES = ("auto", "avx2", "onednn", "torch")  # --cpu-linear


def install(model: nn.Module, choice: str = "auto", merge: Iterable[Sequence[nn.Linear]] = ()) -> int:
    """Pack the weight of every CPU `nn.Linear` of `model` for `choice` (CHOICES): `auto` picks as the
    module docstring says, `torch` leaves the plain weights to torch's own GEMM. Each group in `merge`
    (layers of `model` reading the same input) is packed as one layer (the module docstring). A model
    packed for another backend is unpacked first; packed for this one, it is left as it is. Returns the
    number of layers packed now. Raises ValueError when a backend named explicitly cannot serve this
    dtype here."""
    if choice not in CHOICES:
        raise ValueError(f"unknown linear backend {choice!r}; choose from {', '.join(CHOICES)}")
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"]
    dtype = layers[0].weight.dtype if layers else None  # a packed layer's empty stand-in keeps it
    backend = None if dtype not in (torch.float32, torch.bfloat16) or choice == "torch" else _choose(dtype, choice)
    if getattr(model, _CHOSEN, backend) != backend:
        unpack(model)
    if backend is None:
        return 0
    tied = _shared_weights(model)
    packed = [layer for layer in layers if not is_packed(layer)]
    todo = set(map(id, packed))
    for group in merge if backend.merges else ():
        if len(group) > 1 and all(id(m) in todo and id(m.weight) not in tied for m in group) and _mergeable(group):
            _pack_merged(list(group), backend)
            todo -= set(map(id, group))
    for layer in packed:
        if id(layer) not in todo:
            continue
        _set_packed(layer, layer.weight.detach(), backend)
        if id(layer.weight) not in tied:  # the packed copy replaces it: no second copy of the model
            layer.weight = nn.Parameter(layer.weight.new_empty(0), requires_grad=False)
    setattr(model, _CHOSEN, backend)
    if packed:
        log.info("packed %d linear layers for %s (%s), %d of them merged with the layers reading their input",
                 len(packed), backend.name, str(backend.compute).split(".")[-1], len(packed) - len(todo))
    return len(packed)


def siblings(layers: Sequence[nn.Linear], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of `layers` applied to `x`: in one call when `install` merged exactly these layers (each output
    then a view of its columns), else one call each."""
    first = getattr(layers[0], MERGED, None)
    if first is not None and first[1] == 0 and first[0].parts == len(layers):
        return first[0](x).split([m.out_features for m in layers], dim=-1)
    return tuple(m(x) for m in layers)


def merged(layer: nn.Module) -> nn.Linear | None:
    """The merged layer a layer's weight is packed in (`install`'s `merge`), if it leads one, else None."""
    first = getattr(layer, MERGED, None)
    return first[0] if first is not None and first[1] == 0 else None


def is_packed(layer: nn.Module) -> bool:
    """Whether `install` packed the layer's weight (alone, or inside a merged layer)."""
    return hasattr(layer, PACKED) or hasattr(layer, MERGED)


def _mergeable(group: Sequence[nn.Linear]) -> bool:
    """Whether `group` can be one layer: the same input features and dtype, a bias on all or none."""
    head = group[0]
    return all(m.in_features == head.in_features and m.weight.dtype == head.weight.dtype
               and (m.bias is None) == (head.bias is None) for m in group)


def _set_packed(layer: nn.Linear, weight: torch.Tensor, backend: _Backend) -> None:
    """Pack `weight` (the layer's, or a merged group's) on `layer` and run the layer on it; where our
    kernel reads oneDNN's layout in place (`onednn_rows`), it takes the layer's few-row calls."""
    blocked = backend.pack(weight.to(backend.compute))
    if not torch.equal(_plain(blocked, weight.shape[0]).to(weight.dtype), weight):
        raise RuntimeError(f"packing a {tuple(weight.shape)} weight for {backend.name} lost values")
    setattr(layer, PACKED, blocked)
    setattr(layer, ROWS, ONEDNN_ROWS[weight.dtype] if _rows_kernel_reads(blocked, weight) else 0)
    layer.forward = types.MethodType(backend.forward, layer)


def _rows_kernel_reads(blocked: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `onednn_rows` can run on oneDNN's packing `blocked` of `weight`: packed in the weight's own dtype,
    an AVX-512 CPU (bfloat16: with AVX512-BF16), the kernels built, and the bytes in the layout it reads
    (checked, every one)."""
    cpu = {torch.bfloat16: torch.cpu._is_avx512_bf16_supported, torch.float32: torch.cpu._is_avx512_supported}
    return (blocked.is_mkldnn and blocked.dtype == weight.dtype and weight.dtype in cpu and cpu[weight.dtype]()
            and cpu_kernels.available() and cpu_kernels.ops().onednn_layout(blocked, weight))


def _pack_merged(group: list[nn.Linear], backend: _Backend) -> None:
    """Pack `group`'s weights side by side in one new layer; each layer of it gives up its weight and
    answers alone with its columns of the merged layer's output."""
    head = group[0]
    bias = None if head.bias is None else torch.cat([m.bias.detach() for m in group])
    one = nn.Linear(head.in_features, sum(m.out_features for m in group), bias=bias is not None, device="meta")
    one.weight = nn.Parameter(head.weight.new_empty(0), requires_grad=False)
    one.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    _set_packed(one, torch.cat([m.weight.detach() for m in group]), backend)
    one.parts = len(group)
    first = 0
    for layer in group:
        setattr(layer, MERGED, (one, first))  # a tuple: not registered as a submodule of the model
        first += layer.out_features
        layer.weight = nn.Parameter(layer.weight.new_empty(0), requires_grad=False)
        layer.forward = types.MethodType(_part_forward, layer)


def _part_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A merged layer's member called alone: its columns of the group's call, contiguous as a layer's own
    output would be (what follows may take another path on a view, with other bits)."""
    one, first = getattr(self, MERGED)
    return one(x).narrow(-1, first, self.out_features).contiguous()


def describe(model: nn.Module) -> str:
    """Where the model's CPU linear layers run, for the log and /info: e.g. 'oneDNN (bfloat16)'."""
    backend = getattr(model, _CHOSEN, None)
    if backend is None:
        return "torch (plain F.linear)"
    return f"{backend.name} ({str(backend.compute).split('.')[-1]})"


def unpack(model: nn.Module) -> None:
    """Undo `install`: every packed layer gets its plain weight back (exactly: the packing only reorders,
    and `install` checked that it did)."""
    for layer in model.modules():
        part = getattr(layer, MERGED, None)
        if part is not None:
            one, first = part
            plain = _plain(getattr(one, PACKED), one.out_features)[first:first + layer.out_features]
            layer.weight = nn.Parameter(plain.to(layer.weight.dtype).clone(), requires_grad=False)
            del layer.forward
            delattr(layer, MERGED)
            continue
        packed = getattr(layer, PACKED, None)
        if packed is None:
            continue
        if layer.weight.numel() == 0:  # the empty stand-in keeps the weight's dtype
            layer.weight = nn.Parameter(_plain(packed, layer.out_features).to(layer.weight.dtype), requires_grad=False)
        del layer.forward
        delattr(layer, PACKED)
        delattr(layer, ROWS)
    if hasattr(model, _CHOSEN):
        delattr(model, _CHOSEN)


def kernel_weight(layer: nn.Module) -> torch.Tensor | None:
    """The packed weight of a layer that runs on the AVX2 kernel (`_kernel_forward`), else None."""
    return getattr(layer, PACKED) if _packed_forward(layer) is _kernel_forward else None


def packed_weight(layer: nn.Module) -> torch.Tensor | None:
    """The packed weight of a layer that runs on either backend, else None: a dense [blocks, in, 16]
    tensor for the AVX2 kernel, a oneDNN (mkldnn) tensor for oneDNN. csrc/forward.cpp's `linear` tells
    them apart by layout, and computes each as its forward here does."""
    return getattr(layer, PACKED) if _packed_forward(layer) in (_kernel_forward, _onednn_forward) else None


def _packed_forward(layer: nn.Module):
    forward = layer.__dict__.get("forward")  # set on the instance by `install`
    return getattr(forward, "__func__", None)


def weight_numel(layer: nn.Module) -> int:
    """The elements of a layer's weights, packed ones included (packing frees the plain weight)."""
    plain = sum(p.numel() for p in layer.parameters(recurse=False))
    packed = is_packed(layer) and layer.weight.numel() == 0
    return plain + (layer.in_features * layer.out_features if packed else 0)


def _choose(dtype: torch.dtype, choice: str = "auto") -> _Backend | None:
    """`auto`: the AVX2 kernel where AVX2 is the CPU's best vector unit and the kernel works; else oneDNN
    in `dtype`, or widened to float32 for bfloat16; else None (logged). `avx2` or `onednn`: that one, or
    ValueError saying why it cannot run here."""
    if choice == "avx2" or (choice == "auto" and torch.backends.cpu.get_cpu_capability() == "AVX2"):
        problem = unavailable("avx2", dtype)
        if not problem:
            return _kernel(dtype)
        if choice == "avx2":
            raise ValueError(f"the AVX2 linear kernel cannot run here: {problem}")
        log.warning("the AVX2 linear kernel is off (%s); linear layers go to oneDNN", problem)
    if not torch.backends.mkldnn.is_available():
        if choice == "onednn":
            raise ValueError("oneDNN linears cannot run here: this build of torch has no oneDNN")
        log.info("linear layers stay on torch's own CPU GEMM: no oneDNN in this build of torch")
        return None
    problem = _native_problem(dtype)
    if not problem:
        return _onednn(dtype)
    if dtype == torch.bfloat16 and not _probe(_ONEDNN, dtype):
        return _ONEDNN  # no native bfloat16 GEMM: widened, it runs at float32's speed, not emulated
    if choice == "onednn":
        raise ValueError(f"oneDNN cannot pack {dtype} weights here: {problem}")
    log.info("linear layers stay on torch's own CPU GEMM: oneDNN cannot pack %s weights here (%s)", dtype, problem)
    return None


def unavailable(choice: str, dtype: torch.dtype = torch.float32) -> str:
    """Why the backend `choice` ('avx2' or 'onednn') cannot serve linears of `dtype` on this machine
    ('' when it can). The AVX2 kernel runs on any x86 CPU with AVX2 and FMA, AVX-512 ones included."""
    if choice == "avx2":
        if not torch.cpu._is_avx2_supported():
            return "this CPU has no AVX2"
        if not cpu_kernels.available():
            return "the CPU kernels did not build (see the warning logged)"
        return _probe(_kernel(dtype), dtype)
    if not torch.backends.mkldnn.is_available():
        return "this build of torch has no oneDNN"
    return _native_problem(dtype) and _probe(_ONEDNN, dtype)


def _native_bfloat16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU: AVX512-BF16 or AMX."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _native_problem(dtype: torch.dtype) -> str:
    """Why oneDNN cannot compute `dtype` natively here ('' when it can): bfloat16 needs AVX512-BF16 or AMX
    (elsewhere oneDNN emulates it, far slower than float32), and a probe of the packing."""
    if dtype == torch.bfloat16 and not _native_bfloat16():
        return "no native bfloat16 GEMM on this CPU (neither AVX512-BF16 nor AMX)"
    return _probe(_onednn(dtype), dtype)


def _block(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [blocks, in, BLOCK]: output columns in blocks, each block's rows contiguous, zero-padded."""
    out, inp = weight.shape
    blocks = -(-out // BLOCK)
    padded = torch.zeros(blocks * BLOCK, inp, dtype=weight.dtype)
    padded[:out] = weight
    return padded.view(blocks, BLOCK, inp).transpose(1, 2).contiguous()


def _plain(packed: torch.Tensor, out: int) -> torch.Tensor:
    """A packed weight (either backend's) back in its plain [out, in] layout."""
    if packed.is_mkldnn:
        return packed.to_dense()
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:out].contiguous()


def _kernel_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, self.in_features)
    bias = self.bias
    if x.dtype != torch.float32:  # bfloat16: computed in float32
        rows, bias = rows.float(), None if bias is None else bias.float()
    y = cpu_kernels.ops().packed_linear(rows.contiguous(), getattr(self, PACKED), bias, self.out_features)
    return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed = getattr(self, PACKED)
    if cpu_kernels.available():  # a few rows on our kernel, more padded to the row counts oneDNN has built for
        return cpu_kernels.ops().onednn_linear(x, packed, self.bias, getattr(self, ROWS))
    if packed.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
    bias = None if self.bias is None else self.bias.to(packed.dtype)  # widened bfloat16: computed in float32
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "").to(x.dtype)


def _onednn(dtype: torch.dtype) -> _Backend:
    # merged: bfloat16 only; float32 groups ran 2-3% slower merged from 64 rows up (the few-row calls go to onednn_rows)
    return _Backend("oneDNN", torch.ops.mkldnn._reorder_linear_weight, _onednn_forward, dtype,
                    merges=dtype == torch.bfloat16)


def _kernel(dtype: torch.dtype) -> _Backend:
    return _Backend("the AVX2 kernel", _block, _kernel_forward, dtype)


_ONEDNN = _onednn(torch.float32)
_CHOSEN = "_softprompt_linears"  # on the model, while packed: the _Backend its layers run on


def _probe(backend: _Backend, dtype: torch.dtype) -> str:
    """Why `backend` cannot serve linears of `dtype` here ('' when it can): packing refused, or a result off
    from plain F.linear. The shapes take every tile size of the AVX2 kernel, a partly filled block, input
    features past its slice depths (64 and 256: partial sums carried across slices), and row counts on both
    sides of its memory-bound/compute-bound split; and for oneDNN, a few rows, which `onednn_rows` takes where
    it reads oneDNN's bfloat16 layout."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 300, generator=generator).to(dtype)
    bias = torch.randn(37, generator=generator).to(dtype)
    layer = nn.Linear(300, 37).to(dtype)
    for rows in (3, 21, 50):  # 21: tiles of 6 and one of 3, sliced; 50: one pass per tile
        x = torch.randn(rows, 300, generator=generator).to(dtype)
        want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        try:
            with torch.no_grad():
                layer.bias.copy_(bias)
                _set_packed(layer, weight, backend)
                got = layer(x)
        except RuntimeError as exc:
            return str(exc).strip().splitlines()[0]
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        error = (got.float() - want).abs().max().item()
        if not error <= tolerance * want.abs().max().item():
            return f"off by {error:.2e} on a probe"
    return ""


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    held = Counter(id(param) for module in model.modules() for param in module.parameters(recurse=False))
    return {key for key, count in held.items() if count > 1}
