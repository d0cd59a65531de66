"""MULTITASK_PROMPT_TUNING: one shared prompt and, per task, a low-rank factor that scales it.

PEFT's `MultitaskPromptEmbedding`: the prompt of task t is `embedding * (prefix_task_cols[t] @
prefix_task_rows[t])`, elementwise: [n, hidden] * ([n, ranks] @ [ranks, hidden]). `save_pretrained`
writes the three tensors as they are (`prompt_embeddings`, `prefix_task_cols`, `prefix_task_rows`),
never one table: every task is its own table, so each (adapter, task) materializes into its own
KV prefix, and a request names its task.
"""

from __future__ import annotations

import torch

from .base import EmbeddingKind, config_int, register_kind
from .errors import InvalidAdapter
from .spec import ModelSpec

DEFAULT_RANKS = 1  # PEFT's MultitaskPromptTuningConfig defaults
DEFAULT_TASKS = 1
MAX_TASKS = 4096  # a config asking for more is refused before anything is allocated
MAX_RANKS = 4096


class MultitaskPromptTuning(EmbeddingKind):
    peft_type = "MULTITASK_PROMPT_TUNING"
    # PEFT's saved name of the shared embedding -> the encoder's (the other two are saved under their own)
    saved_names = {"prompt_embeddings": "embedding.weight"}

    def tasks(self, config: dict) -> int:
        return config_int(config, "num_tasks", default=DEFAULT_TASKS)

    def check_config(self, config: dict, spec: ModelSpec) -> None:
        super().check_config(config, spec)
        for key, cap in (("num_tasks", MAX_TASKS), ("num_ranks", MAX_RANKS)):
            value = self.encoder_sizes(config)[key]
            if value > cap:
                raise InvalidAdapter(f"adapter_config.json: {key}={value} is more than the {cap} this server allows")

    def encoder_sizes(self, config: dict) -> dict[str, int]:
        return {
            "num_virtual_tokens": config_int(config, "num_virtual_tokens"),
            "token_dim": config_int(config, "token_dim"),
            "num_tasks": config_int(config, "num_tasks", default=DEFAULT_TASKS),
            "num_ranks": config_int(config, "num_ranks", default=DEFAULT_RANKS),
        }

    def encoder_shapes(self, config: dict) -> dict[str, tuple[int, ...]]:
        sizes = self.encoder_sizes(config)
        n, d, t, r = sizes["num_virtual_tokens"], sizes["token_dim"], sizes["num_tasks"], sizes["num_ranks"]
        return {"embedding.weight": (n, d), "prefix_task_cols": (t, n, r), "prefix_task_rows": (t, r, d)}

    def encoder(self, config: dict) -> torch.nn.Module:
        sizes = self.encoder_sizes(config)
        return MultitaskPromptEmbedding(sizes["num_virtual_tokens"], sizes["token_dim"], sizes["num_tasks"],
                                        sizes["num_ranks"])


class MultitaskPromptEmbedding(torch.nn.Module):
    """PEFT's `MultitaskPromptEmbedding` at inference, for one task."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_tasks: int, num_ranks: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_virtual_tokens, token_dim)
        self.prefix_task_cols = torch.nn.Parameter(torch.zeros(num_tasks, num_virtual_tokens, num_ranks))
        self.prefix_task_rows = torch.nn.Parameter(torch.zeros(num_tasks, num_ranks, token_dim))

    def forward(self, indices: torch.Tensor, task: int) -> torch.Tensor:  # [n] -> [n, token_dim]
        scale = self.prefix_task_cols[task][indices] @ self.prefix_task_rows[task]  # [n, ranks] @ [ranks, token_dim]
        return self.embedding(indices) * scale


register_kind(MultitaskPromptTuning())
