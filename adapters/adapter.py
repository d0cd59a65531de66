"""A materialized adapter: what the engine serves from, whatever kind it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import KINDS, AdapterKind
from .spec import ModelSpec


@dataclass(frozen=True, eq=False)
class Adapter:
    name: str
    peft_type: str
    num_virtual_tokens: int
    source: str  # where it came from: "upload", "disk" or "s3" (the store), "hub", "demo"
    created_at: float  # unix time this version was registered
    config: dict = field(repr=False)  # adapter_config.json as read
    kv: torch.Tensor = field(repr=False)  # [layers, 2, kv_heads, n, head_dim] on the model's device and dtype
    embeddings: torch.Tensor | None = field(repr=False)  # [n, hidden]: virtual-token embeddings, prompt kinds only
    version: str = ""  # a hash of its two files (loading.content_version); "" for one built in memory
    task: int | None = None  # the task this prefix is of, for a kind with tasks (multitask prompt tuning)

    @property
    def prefix_length(self) -> int:
        return self.kv.shape[3]

    @property
    def prefix_key(self) -> tuple:
        """What identifies its prefix's contents, for the engine's shared KV segments: name, version (a
        hash of its files) and task; one built in memory (no version) is itself alone."""
        if self.version:
            return self.name, self.version, self.task, self.prefix_length
        return self.name, "", self.task, id(self)

    @property
    def prefix_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            "source": self.source,
            "created_at": self.created_at,
            "version": self.version,
            "task_type": self.config.get("task_type"),
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
            "prefix_bytes": self.prefix_bytes,
        } | self.tasks()

    def tasks(self) -> dict:
        """{"num_tasks": N} for a kind with tasks (a request names one of 0..N-1), else {}."""
        kind = KINDS.get(self.peft_type)
        tasks = kind.tasks(self.config) if kind is not None else None
        return {} if tasks is None else {"num_tasks": tasks}


def materialize(kind: AdapterKind, table: torch.Tensor, spec: ModelSpec, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn a kind's table [n, width] into the cached key/value prefix (and embeddings, if it has them)."""
    if not kind.rows_are_embeddings:
        n = table.shape[0]
        # [n, 2 * layers * kv_dim] -> [layers * 2, kv_heads, n, head_dim]; key of layer l at 2l, value at 2l + 1
        kv = table.view(n, spec.num_layers * 2, spec.num_kv_heads, spec.head_dim).permute(1, 2, 0, 3)
        kv = kv.reshape(spec.num_layers, 2, spec.num_kv_heads, n, spec.head_dim)
        return kv.to(spec.device, spec.dtype).contiguous(), None
    embeddings = table.to(spec.device, spec.dtype)
    return virtual_tokens_to_kv(model, embeddings), embeddings


@torch.inference_mode()
def virtual_tokens_to_kv(model, embeddings: torch.Tensor) -> torch.Tensor:
    """Run the frozen model once over the virtual tokens at positions 0..n-1 and keep their keys/values.

    In a causal model the virtual tokens attend only to each other, so these keys/values are the
    same for every request: serving from them equals prepending the embeddings, minus the prefill.
    embeddings [n, hidden] -> [layers, 2, kv_heads, n, head_dim]; or, several prompts of one length in
    one forward (inline soft prompts), [b, n, hidden] -> [b, layers, 2, kv_heads, n, head_dim].
    """
    batched = embeddings.dim() == 3
    rows = embeddings if batched else embeddings[None]  # [b, n, hidden]
    b, n = rows.shape[:2]
    positions = torch.arange(n, device=embeddings.device)[None].expand(b, n)
    keep = {"logits_to_keep": 1} if batched else {}  # the keys/values are wanted, not [b, n, vocab] logits
    out = model(inputs_embeds=rows, position_ids=positions, use_cache=True, **keep)
    # The cache object a forward returns is a transformers internal (server/engine/attention.py lists
    # them, with their tests): `cache` since 5.24, `past_key_values` before (5.24 warns on the old name).
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    kv = torch.stack([torch.stack([layer.keys, layer.values], 1) for layer in cache.layers], 1)
    return kv.contiguous() if batched else kv[0].contiguous()
