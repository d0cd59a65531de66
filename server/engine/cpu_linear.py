"""The model's linear layers on CPU through oneDNN, their weights packed once at start.

`torch.nn.functional.linear` on CPU hands MKL the weight in its plain [out, in] layout at every
call. With a step's weights out of cache (any real model: the bench model alone is 92 MB), MKL's
small-batch GEMM reads them far below the memory's speed; oneDNN, given the weight already
reordered into its blocked layout (what vLLM's CPU build does too), streams it. Measured with the
bench model's 33 weight matrices of [1360, 512] (92 MB) on the 2-core AMD EPYC here, float32,
milliseconds for one pass through all of them, plain linear / packed oneDNN:
  1 row (one stream decoding) 9.1 / 6.4, 4 rows 18.4 / 7.6, 16 rows 19.8 / 12.1, 64 rows 45.2 / 28.6,
  512 rows 259 / 180, 2048 rows 917 / 686.
With the weights in cache the two are within a few percent, which is why a hot microbenchmark
shows no difference.

oneDNN keeps each shape's compiled call (its primitive, with buffers sized by the rows) in two
caches of 1024 entries by default; a step's row count changes with every arrival, so unbounded they
grew a server's memory by half under the load test. `install` caps both at `CACHE_CAPACITY` (unless
set in the environment): a step uses about 7 shapes, a new one costs about 0.5 ms, and the cached
buffers then stay under CACHE_CAPACITY x (max prefill tokens + max batch) x widest layer x 4 bytes
(50 MB for the bench model at the server's defaults). The caps are read at oneDNN's first use in the
process, so a process that used oneDNN before `install` keeps whatever it had.

`install` replaces, on each `nn.Linear` of the model, the forward by the packed call and frees the
plain weight (a tied weight, such as an lm_head sharing the embedding table, is packed and kept).
`unpack` gives the plain weights back: torch.compile traces plain linears and cannot take oneDNN's
opaque tensors. oneDNN packs bfloat16 only on CPUs with AVX512-BF16 or AVX-NE-CONVERT; elsewhere torch's bfloat16
GEMM is emulated, and the bench model ran at 144 tok/s in bfloat16 against 664 in float32. There the
bfloat16 weights are packed widened to float32 and each layer computes in float32, its output
rounded back to bfloat16 (the KV cache and activations stay bfloat16): the weights take float32's
memory, at float32's speed. Any other dtype oneDNN cannot pack, or a packed layer that disagrees
with the plain one on a probe, leaves every layer as it was.
"""

from __future__ import annotations

import logging
import os
import types
from collections import Counter

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKED = "_softprompt_packed"  # the attribute holding a packed layer's oneDNN weight
CACHE_CAPACITY = 32  # shapes kept by oneDNN's primitive cache and by ideep's, each
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def install(model: nn.Module) -> int:
    """Pack the weight of every CPU `nn.Linear` of `model` (once; again is a no-op). Returns the
    number of layers packed, 0 when oneDNN cannot pack this dtype here."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and not hasattr(m, PACKED)
              and m.weight.device.type == "cpu" and m.weight.dtype in (torch.float32, torch.bfloat16)]
    if not layers or not torch.backends.mkldnn.is_available():
        return 0
    for variable in CACHE_VARIABLES:
        os.environ.setdefault(variable, str(CACHE_CAPACITY))
    dtype = layers[0].weight.dtype
    problem = _probe(dtype)
    compute = dtype
    if problem and dtype == torch.bfloat16 and not _probe(torch.float32):
        compute = torch.float32  # no native bfloat16 GEMM: widened, it runs at float32's speed, not emulated
        log.info("bfloat16 linear layers packed as float32 for oneDNN (%s); their weights take float32's memory",
                 problem)
    elif problem:
        log.info("linear layers stay on torch's own CPU GEMM: oneDNN cannot pack %s weights here (%s)", dtype, problem)
        return 0
    tied = _shared_weights(model)
    for layer in layers:
        setattr(layer, PACKED, torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach().to(compute)))
        if id(layer.weight) not in tied:  # the packed copy replaces it: no second copy of the model
            layer.weight = nn.Parameter(layer.weight.new_empty(0), requires_grad=False)
        layer.forward = types.MethodType(_packed_forward, layer)
    log.info("packed %d linear layers for oneDNN", len(layers))
    return len(layers)


def unpack(model: nn.Module) -> None:
    """Undo `install`: every packed layer gets its plain weight back (exactly: the packing only reorders)."""
    for layer in model.modules():
        packed = getattr(layer, PACKED, None)
        if packed is None:
            continue
        if layer.weight.numel() == 0:  # the empty stand-in keeps the weight's dtype
            layer.weight = nn.Parameter(packed.to_dense().to(layer.weight.dtype), requires_grad=False)
        del layer.forward
        delattr(layer, PACKED)


def weight_numel(layer: nn.Module) -> int:
    """The elements of a layer's weights, packed ones included (packing frees the plain weight)."""
    packed = getattr(layer, PACKED, None)
    plain = sum(p.numel() for p in layer.parameters(recurse=False))
    return plain + (packed.numel() if packed is not None and layer.weight.numel() == 0 else 0)


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed = getattr(self, PACKED)
    if packed.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
    bias = None if self.bias is None else self.bias.to(packed.dtype)  # widened bfloat16: computed in float32
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "").to(x.dtype)


def _probe(dtype: torch.dtype) -> str:
    """Why oneDNN cannot serve linears of `dtype` here ('' when it can): packing refused, or a result off."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator).to(dtype)
    bias = torch.randn(48, generator=generator).to(dtype)
    x = torch.randn(3, 5, 40, generator=generator).to(dtype)
    try:
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(weight), bias,
                                                     "none", [], "")
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    want = nn.functional.linear(x, weight, bias)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    error = (got.float() - want.float()).abs().max().item()
    return "" if error <= tolerance * want.float().abs().max().item() else f"off by {error:.2e} on a probe"


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    held = Counter(id(param) for module in model.modules() for param in module.parameters(recurse=False))
    return {key for key, count in held.items() if count > 1}
