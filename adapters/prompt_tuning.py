"""PROMPT_TUNING: learned virtual-token embeddings prepended to the input embeddings."""

from __future__ import annotations

import torch

from .base import AdapterKind, check_matches, config_int, register_kind
from .spec import ModelSpec


class PromptTuning(AdapterKind):
    peft_type = "PROMPT_TUNING"
    rows_are_embeddings = True

    def table_width(self, spec: ModelSpec) -> int:
        return spec.hidden_size

    def check_config(self, config: dict, spec: ModelSpec) -> None:
        check_matches(config, "token_dim", spec.hidden_size, "hidden size")
        check_matches(config, "num_layers", spec.num_layers, "number of layers")

    def encoder(self, config: dict) -> torch.nn.Module:
        return PromptEmbedding(config_int(config, "num_virtual_tokens"), config_int(config, "token_dim"))


class PromptEmbedding(torch.nn.Module):
    """PEFT's `PromptEmbedding`: one learned vector per virtual token."""

    def __init__(self, num_virtual_tokens: int, token_dim: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_virtual_tokens, token_dim)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:  # [n] -> [n, token_dim]
        return self.embedding(indices)


register_kind(PromptTuning())
