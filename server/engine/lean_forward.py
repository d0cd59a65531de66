"""The packed step's forward for Llama, Qwen2 and Mistral, written out: transformers' computation without its plumbing.

transformers' forward of a decoder passes each layer through several wrappers (output capture,
gradient-checkpointing layers, keyword merging, the attention interface's lookup), about a
millisecond of Python per layer and step on the CPU here, as much as the layer's arithmetic when
one request decodes. `LeanForward` runs the same modules' weights through the same operations in
the same order, on the packed step's [tokens, ...] tensors: the model's own embedding, rotary
embedding, norms, projections and MLP modules, the attention through `attention.attend`. On CPU the
rotary embedding and bfloat16 rows' norms run in one C++ pass each (`cpu/rowwise.py`: the rotary
embedding's bits are ATen's; a bfloat16 norm sums its row's squares in an order of its own). Only the
final norm and lm_head run on just the rows that sample (transformers normalizes every row, then
keeps those): row-wise, so the same numbers.

Taken for the classes in SUPPORTED whose layers have exactly the modules this code calls; any
other model keeps transformers' forward with our attention registered in it. The start-up
self-check (`self_check.py`) compares whichever forward the runner uses against transformers' own.

On CPU, a step runs its layers in one C++ call (`cpu/native_decode.py`,
cpu/csrc/forward.cpp): the same operations in the same order, so the same numbers, but without the
GIL. The server's event loop shares this interpreter; while it wrote a step's tokens, the engine
thread stalled at its next operation for the GIL, and serving cost the engine as much time as the
loop spent (bench/README.md, "Threads and cores").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import attention, rope
from .ragged import ranges
from .cpu import linear as cpu_linear, rowwise as cpu_rowwise
from .cpu.native_decode import SILU, NativeDecode

# the classes written out, each with where its attention finds its sliding window (as its own forward does)
SUPPORTED = {
    "LlamaForCausalLM": lambda attn, config: None,
    "Qwen2ForCausalLM": lambda attn, config: attn.sliding_window,  # per layer: config.layer_types
    "MistralForCausalLM": lambda attn, config: getattr(config, "sliding_window", None),
}
ATTENTION_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_MODULES = {"gate_proj", "up_proj", "down_proj"}


@dataclass
class LeanOutput:
    logits: torch.Tensor  # [1, sampled rows, vocab], as transformers' output with logits_to_keep


class LeanForward:
    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.head_dim = self.layers[0].self_attn.head_dim
        window = SUPPORTED[type(model).__name__]
        self.windows = [window(layer.self_attn, model.config) for layer in self.layers]
        self.native: NativeDecode | None = None  # set by `find_native` once the linears are packed
        # the rotary embedding and the norms: on CPU each in one C++ pass (`cpu/rowwise.py`), as the native decode
        rowwise = cpu_rowwise.available(self.layers[0].input_layernorm.weight.device)
        self.norm, self.rotate = (cpu_rowwise.rms_norm, cpu_rowwise.rotary) if rowwise else (_norm, _rotate)
        self.mlps = [cpu_rowwise.mlp if rowwise and type(layer.mlp.act_fn).__name__ in SILU else _module
                     for layer in self.layers]

    def find_native(self, mode: str = "auto", attention_kernel: bool = True) -> None:
        """Take the one-call decoding step (`mode` on, or auto) if the layers now allow it (after
        `cpu_linear.install`) and decode attention runs on the kernel. ValueError when `mode` is on and it
        cannot be taken."""
        self.native = None
        if mode == "off":
            return
        why = NativeDecode.unavailable(self) or ("" if attention_kernel else "attention is not on the kernel")
        if why and mode == "on":
            raise ValueError(f"the native decode cannot run here: {why}")
        if not why:
            self.native = NativeDecode.build(self)

    def siblings(self) -> list[list[nn.Linear]]:
        """The linears that read the same input, which `cpu_linear.install` may pack as one: each layer's
        q/k/v projections, and its MLP's gate and up where its MLP runs here (`mlps`)."""
        groups = [[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj] for layer in self.layers]
        return groups + [[layer.mlp.gate_proj, layer.mlp.up_proj] for layer, mlp in zip(self.layers, self.mlps)
                         if mlp is cpu_rowwise.mlp]

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether `model` is a class written out here, with the modules this code calls and nothing more."""
        if type(model).__name__ not in SUPPORTED or getattr(model.config, "pretraining_tp", 1) != 1:
            return False
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if {name for name, _ in attn.named_children()} != ATTENTION_MODULES:
                return False  # e.g. per-head q/k norms
            if {name for name, _ in mlp.named_children()} - {"act_fn"} != MLP_MODULES:
                return False
        return True

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ragged: attention.RaggedStep,
                 logits_to_keep: torch.Tensor, on_layers: Callable[[], None] = lambda: None, **_) -> LeanOutput:
        """input_ids, position_ids: [1, tokens]; logits_to_keep: the rows whose logits are returned;
        on_layers: called once everything before the layers is done (`ModelRunner.on_layers`)."""
        h = self.inner.embed_tokens(input_ids[0])  # [tokens, hidden]
        tokens, head_dim = h.shape[0], self.head_dim
        cos, sin = rope.cos_sin(self.inner.rotary_emb, h, position_ids, ragged)  # [1, tokens, head_dim]
        cos, sin = cos[0, :, None], sin[0, :, None]  # [tokens, 1, head_dim]: broadcast over heads
        if self.native is not None and self.native.takes(ragged, h):
            ranges(ragged)  # its index tensors, built now rather than after on_layers
            on_layers()
            h = self.native(h, cos, sin, ragged)
        else:
            on_layers()
            for layer, window, mlp in zip(self.layers, self.windows, self.mlps):
                attn = layer.self_attn
                x = self.norm(layer.input_layernorm, h)
                q, k, v = (y.view(tokens, -1, head_dim)
                           for y in cpu_linear.siblings((attn.q_proj, attn.k_proj, attn.v_proj), x))
                q = self.rotate(q, cos, sin)
                k = self.rotate(k, cos, sin)
                o = attention.attend(ragged, attn.layer_idx, q, k, v, attn.scaling, window)
                h = h + attn.o_proj(o.reshape(tokens, -1))
                h = h + mlp(layer.mlp, self.norm(layer.post_attention_layernorm, h))
        logits = self.model.lm_head(self.norm(self.inner.norm, h[logits_to_keep]))
        return LeanOutput(logits[None])


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


def _module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
