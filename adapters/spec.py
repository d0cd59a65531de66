"""What an adapter needs to know about the base model: sizes, device and dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int  # width of the input embeddings
    num_layers: int  # decoder layers, each with its own key/value prefix
    num_kv_heads: int  # key/value heads (fewer than attention heads under GQA)
    head_dim: int
    device: torch.device
    dtype: torch.dtype

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config, device: torch.device, dtype: torch.dtype) -> "ModelSpec":
        """Read the sizes from a transformers config (Llama, Qwen2, Mistral, GPT-2, ... naming)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = _first(config, "hidden_size", "n_embd", "d_model")
        layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first(config, "num_attention_heads", "n_head")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(hidden, layers, kv_heads, head_dim, torch.device(device), dtype)


def _first(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"model config has none of {names}")
