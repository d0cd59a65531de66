"""P_TUNING: virtual-token embeddings produced by a prompt encoder (MLP, or bidirectional LSTM + MLP)."""

from __future__ import annotations

import torch

from .base import EmbeddingKind, config_int, linear_shapes, register_kind
from .errors import InvalidAdapter
from .spec import ModelSpec

ENCODER_TYPES = ("MLP", "LSTM")
DEFAULT_LSTM_LAYERS = 2  # PEFT's PromptEncoderConfig.encoder_num_layers


class PTuning(EmbeddingKind):
    peft_type = "P_TUNING"

    def check_config(self, config: dict, spec: ModelSpec) -> None:
        super().check_config(config, spec)
        encoder_type = config.get("encoder_reparameterization_type", "MLP")
        if encoder_type not in ENCODER_TYPES:
            raise InvalidAdapter(
                f"adapter_config.json: encoder_reparameterization_type {encoder_type!r} is not one of {ENCODER_TYPES}"
            )

    def encoder_sizes(self, config: dict) -> dict[str, int]:
        sizes = {
            "num_virtual_tokens": config_int(config, "num_virtual_tokens"),
            "token_dim": config_int(config, "token_dim"),
            "encoder_hidden_size": config_int(config, "encoder_hidden_size"),
        }
        if _is_lstm(config):  # an MLP ignores encoder_num_layers, as in PEFT
            sizes["encoder_num_layers"] = config_int(config, "encoder_num_layers", default=DEFAULT_LSTM_LAYERS)
        return sizes

    def encoder_shapes(self, config: dict) -> dict[str, tuple[int, ...]]:
        sizes = self.encoder_sizes(config)
        n, d, h = sizes["num_virtual_tokens"], sizes["token_dim"], sizes["encoder_hidden_size"]
        shapes = {"embedding.weight": (n, d)}
        if not _is_lstm(config):
            return shapes | linear_shapes("mlp_head", [(0, d, h), (2, h, h), (4, h, d)])
        for layer in range(sizes["encoder_num_layers"]):
            inputs = d if layer == 0 else 2 * h  # the layers above the first read both directions
            for direction in ("", "_reverse"):
                shapes[f"lstm_head.weight_ih_l{layer}{direction}"] = (4 * h, inputs)
                shapes[f"lstm_head.weight_hh_l{layer}{direction}"] = (4 * h, h)
                shapes[f"lstm_head.bias_ih_l{layer}{direction}"] = (4 * h,)
                shapes[f"lstm_head.bias_hh_l{layer}{direction}"] = (4 * h,)
        return shapes | linear_shapes("mlp_head", [(0, 2 * h, 2 * h), (2, 2 * h, d)])

    def encoder(self, config: dict) -> torch.nn.Module:
        sizes = self.encoder_sizes(config)
        return PromptEncoder(
            num_virtual_tokens=sizes["num_virtual_tokens"],
            token_dim=sizes["token_dim"],
            hidden_size=sizes["encoder_hidden_size"],
            lstm_layers=sizes.get("encoder_num_layers", 0),
            encoder_type="LSTM" if _is_lstm(config) else "MLP",
        )


def _is_lstm(config: dict) -> bool:
    return config.get("encoder_reparameterization_type", "MLP") == "LSTM"


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
