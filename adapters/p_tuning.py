"""P_TUNING: virtual-token embeddings produced by a prompt encoder (MLP, or bidirectional LSTM + MLP)."""

from __future__ import annotations

import torch

from .base import EmbeddingKind, config_int, register_kind
from .errors import InvalidAdapter
from .spec import ModelSpec

ENCODER_TYPES = ("MLP", "LSTM")


class PTuning(EmbeddingKind):
    peft_type = "P_TUNING"

    def check_config(self, config: dict, spec: ModelSpec) -> None:
        super().check_config(config, spec)
        encoder_type = config.get("encoder_reparameterization_type", "MLP")
        if encoder_type not in ENCODER_TYPES:
            raise InvalidAdapter(
                f"adapter_config.json: encoder_reparameterization_type {encoder_type!r} is not one of {ENCODER_TYPES}"
            )

    def encoder(self, config: dict) -> torch.nn.Module:
        return PromptEncoder(
            num_virtual_tokens=config_int(config, "num_virtual_tokens"),
            token_dim=config_int(config, "token_dim"),
            hidden_size=config_int(config, "encoder_hidden_size"),
            lstm_layers=config_int(config, "encoder_num_layers", default=2),
            encoder_type=config.get("encoder_reparameterization_type", "MLP"),
        )


class PromptEncoder(torch.nn.Module):
    """PEFT's `PromptEncoder` at inference: embedding -> (LSTM ->) MLP head; names match its checkpoints."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, hidden_size: int, lstm_layers: int, encoder_type: str):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_virtual_tokens, token_dim)
        self.lstm_head = None
        if encoder_type == "LSTM":
            self.lstm_head = torch.nn.LSTM(
                token_dim, hidden_size, num_layers=lstm_layers, bidirectional=True, batch_first=True
            )
            self.mlp_head = torch.nn.Sequential(
                torch.nn.Linear(2 * hidden_size, 2 * hidden_size),
                torch.nn.ReLU(),
                torch.nn.Linear(2 * hidden_size, token_dim),
            )
        else:
            self.mlp_head = torch.nn.Sequential(
                torch.nn.Linear(token_dim, hidden_size),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden_size, hidden_size),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden_size, token_dim),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:  # [n] -> [n, token_dim]
        embeds = self.embedding(indices)
        if self.lstm_head is not None:
            embeds = self.lstm_head(embeds[None])[0][0]
        return self.mlp_head(embeds)


register_kind(PTuning())
