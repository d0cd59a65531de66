"""PREFIX_TUNING: learned key/value vectors for every layer, optionally from a two-layer tanh MLP."""

from __future__ import annotations

import torch

from .base import AdapterKind, check_matches, config_int, linear_shapes, register_kind
from .spec import ModelSpec


class PrefixTuning(AdapterKind):
    peft_type = "PREFIX_TUNING"
    rows_are_embeddings = False

    def table_width(self, spec: ModelSpec) -> int:
        return 2 * spec.num_layers * spec.kv_dim

    def check_config(self, config: dict, spec: ModelSpec) -> None:
        check_matches(config, "num_layers", spec.num_layers, "number of layers")
        check_matches(config, "token_dim", spec.kv_dim, "key/value width (kv heads x head dim)")
        check_matches(config, "num_attention_heads", spec.num_kv_heads, "number of key/value heads")

    def encoder_sizes(self, config: dict) -> dict[str, int]:
        sizes = {
            "num_virtual_tokens": config_int(config, "num_virtual_tokens"),
            "token_dim": config_int(config, "token_dim"),
            "num_layers": config_int(config, "num_layers"),
        }
        if config.get("prefix_projection"):
            sizes["encoder_hidden_size"] = config_int(config, "encoder_hidden_size")
        return sizes

    def encoder_shapes(self, config: dict) -> dict[str, tuple[int, ...]]:
        sizes = self.encoder_sizes(config)
        n, d = sizes["num_virtual_tokens"], sizes["token_dim"]
        width = 2 * sizes["num_layers"] * d
        if "encoder_hidden_size" not in sizes:
            return {"embedding.weight": (n, width)}
        h = sizes["encoder_hidden_size"]
        return {"embedding.weight": (n, d)} | linear_shapes("transform", [(0, d, h), (2, h, width)])

    def encoder(self, config: dict) -> torch.nn.Module:
        sizes = self.encoder_sizes(config)
        return PrefixEncoder(
            num_virtual_tokens=sizes["num_virtual_tokens"],
            token_dim=sizes["token_dim"],
            num_layers=sizes["num_layers"],
            hidden_size=sizes.get("encoder_hidden_size"),
        )


class PrefixEncoder(torch.nn.Module):
    """PEFT's `PrefixEncoder`: an embedding of the whole prefix, or embedding -> Linear-Tanh-Linear."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_layers: int, hidden_size: int | None):
        super().__init__()
        width = 2 * num_layers * token_dim
        self.transform = None
        if hidden_size is None:
            self.embedding = torch.nn.Embedding(num_virtual_tokens, width)
        else:
            self.embedding = torch.nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = torch.nn.Sequential(
                torch.nn.Linear(token_dim, hidden_size), torch.nn.Tanh(), torch.nn.Linear(hidden_size, width)
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:  # [n] -> [n, 2 * layers * kv_dim]
        rows = self.embedding(indices)
        return rows if self.transform is None else self.transform(rows)


register_kind(PrefixTuning())
