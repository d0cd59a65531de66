"""PROMPT_TUNING: learned virtual-token embeddings prepended to the input embeddings."""

from __future__ import annotations

import torch

from .base import EmbeddingKind, config_int, register_kind


class PromptTuning(EmbeddingKind):
    peft_type = "PROMPT_TUNING"

    def encoder_sizes(self, config: dict) -> dict[str, int]:
        return {
            "num_virtual_tokens": config_int(config, "num_virtual_tokens"),
            "token_dim": config_int(config, "token_dim"),
        }

    def encoder_shapes(self, config: dict) -> dict[str, tuple[int, ...]]:
        sizes = self.encoder_sizes(config)
        return {"embedding.weight": (sizes["num_virtual_tokens"], sizes["token_dim"])}

    def encoder(self, config: dict) -> torch.nn.Module:
        sizes = self.encoder_sizes(config)
        return PromptEmbedding(sizes["num_virtual_tokens"], sizes["token_dim"])


class PromptEmbedding(torch.nn.Module):
    """PEFT's `PromptEmbedding`: one learned vector per virtual token."""

    def __init__(self, num_virtual_tokens: int, token_dim: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_virtual_tokens, token_dim)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:  # [n] -> [n, token_dim]
        return self.embedding(indices)


register_kind(PromptTuning())
